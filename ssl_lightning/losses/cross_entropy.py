"""Cross-entropy over the labelled images of the global batch (label -1 marks an unlabelled image)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssl_lightning.distributed import all_reduce_sum


def labelled_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy over the images whose label is >= 0, on all ranks together; zero, with a
    graph, if none is labelled.

    Under DDP the sum and the count are all-reduced (one small collective), so every rank gets the
    mean over the global batch's labelled images, and gradients follow ``ssl_lightning.distributed``'s
    convention: equal to a single process on the concatenated batch after DDP's averaging, however
    the labelled images are spread over the ranks (a per-rank mean would weigh images on a rank with
    few labels more).

    Unlabelled rows are masked out of the sum rather than selected away: selecting by a mask sizes
    the result by the mask's count, which on a GPU must be read on the host, a sync on every step.

    Args:
        logits: (N, C) class scores.
        labels: (N,) class indices, -1 where unlabelled.
        label_smoothing: as ``torch.nn.functional.cross_entropy``.
    """
    labelled = labels >= 0
    per_image = F.cross_entropy(logits, labels.clamp(min=0), reduction="none", label_smoothing=label_smoothing)
    loss_sum, count = all_reduce_sum(torch.stack([(per_image * labelled).sum(), labelled.sum().to(per_image.dtype)]))
    return loss_sum / count.clamp(min=1)
