"""Cross-entropy over the labelled images of a batch (label -1 marks an unlabelled image)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def labelled_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy over the images whose label is >= 0; zero, with a graph, if none is.

    Unlabelled rows are masked out of the sum rather than selected away: selecting by a mask sizes
    the result by the mask's count, which on a GPU must be read on the host, a sync on every step.

    Args:
        logits: (N, C) class scores.
        labels: (N,) class indices, -1 where unlabelled.
        label_smoothing: as ``torch.nn.functional.cross_entropy``.
    """
    labelled = labels >= 0
    per_image = F.cross_entropy(logits, labels.clamp(min=0), reduction="none", label_smoothing=label_smoothing)
    return (per_image * labelled).sum() / labelled.sum().clamp(min=1)
