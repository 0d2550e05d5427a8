"""Cross-entropy against soft targets (Mixup/CutMix labels, a teacher's probabilities)."""

from __future__ import annotations

import torch
from torch import Tensor

from ssl_lightning.distributed import all_reduce_sum


def soft_cross_entropy(logits: Tensor, targets: Tensor, weights: Tensor | None = None) -> Tensor:
    """Weighted mean cross-entropy of ``logits`` against target distributions, over the global batch:

        l_i = - sum_c targets[i, c] log softmax(logits_i)_c
        L   = sum_i w_i l_i / sum_i w_i        (sums over every rank's rows)

    timm's ``SoftTargetCrossEntropy`` with row weights, which leave rows out without selecting them
    (a selection's size would be read on the host): Mixup/CutMix rows whose image or partner is
    unlabelled get weight 0. With no weight left anywhere the loss is 0, with a graph. The sum and
    the weight are all-reduced (one collective), so every rank returns the global mean and gradients
    follow ``ssl_lightning.distributed``'s convention.

    Args:
        logits: [N, C] class scores.
        targets: [N, C] target probabilities (rows summing to 1).
        weights: [N] non-negative row weights; None weighs every row 1.

    Returns:
        The scalar loss, in float32 or the inputs' wider dtype.
    """
    if logits.dim() != 2 or logits.shape != targets.shape:
        raise ValueError(
            f"soft_cross_entropy expects logits and targets of the same 2-D shape [N, C], "
            f"got {tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    if weights is not None and weights.shape != logits.shape[:1]:
        raise ValueError(f"soft_cross_entropy expects one weight per row ({logits.shape[0]}), got {tuple(weights.shape)}")
    # log-softmax in half precision loses the small probabilities the soft targets weigh.
    dtype = torch.promote_types(logits.dtype, torch.float32)
    with torch.autocast(logits.device.type, enabled=False):
        per_row = -(targets.to(dtype) * torch.log_softmax(logits.to(dtype), dim=1)).sum(dim=1)
        weights = torch.ones_like(per_row) if weights is None else weights.to(dtype)
        loss_sum, weight_sum = all_reduce_sum(torch.stack([(per_row * weights).sum(), weights.sum()]))
        return loss_sum / weight_sum.clamp(min=torch.finfo(dtype).tiny)
