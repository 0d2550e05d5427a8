"""The online linear probe: a classifier trained beside a self-supervised method on its detached features."""

from __future__ import annotations

import torch
from torch import nn

from ssl_lightning.losses import labelled_cross_entropy


class OnlineProbe(nn.Linear):
    """A linear classifier on the backbone's features, trained during pre-training without touching
    the representation: its input is detached, so only the probe learns from the labels (SimCLR's
    and solo-learn's online linear evaluation, a running estimate of linear-probe accuracy).

    Rows labelled -1 are masked out of the loss (``labelled_cross_entropy``), so an unlabelled or
    partly labelled batch trains it without a host sync; it has its own parameter group and LR
    (``probe_lr``). It is a plain ``nn.Linear`` (state-dict keys ``weight`` and ``bias``) and no head:
    under FSDP it stays in the root unit, which an EMA teacher never mirrors.
    """

    def loss(self, feats: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy over the labelled rows of the global batch, and the logits."""
        logits = self(feats.detach())
        return labelled_cross_entropy(logits, labels), logits
