"""Shannon entropy of softmax predictions: the objective of Tent and the confidence test of EATA and SAR."""

from __future__ import annotations

import torch
from torch import Tensor


def softmax_entropy(logits: Tensor) -> Tensor:
    """Per-row entropy ``H(p) = -sum_c p_c log p_c`` of ``p = softmax(logits)``, ``[N, C] -> [N]``, in nats
    (Wang et al., "Tent: Fully Test-Time Adaptation by Entropy Minimization", ICLR 2021, Eq. 2;
    DequanWang/tent ``softmax_entropy``). Computed in float32 from ``log_softmax``, so a saturated row
    gives 0, not ``0 * log 0 = nan``."""
    if logits.dim() != 2:
        raise ValueError(f"softmax_entropy expects logits of shape [N, C], got {tuple(logits.shape)}")
    with torch.autocast(logits.device.type, enabled=False):
        log_p = torch.log_softmax(logits.float(), dim=1)
        return -(log_p.exp() * log_p).sum(dim=1)
