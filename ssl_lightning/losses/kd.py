"""Knowledge distillation's soft-target loss (Hinton, Vinyals and Dean 2015, "Distilling the Knowledge
in a Neural Network")."""

from __future__ import annotations

import torch
from torch import Tensor

from ssl_lightning.distributed import all_reduce_sum
from ssl_lightning.losses._checks import check_distillation_inputs


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """``T^2 KL(softmax(t / T) || softmax(s / T))``, the KL summed over classes and averaged over the
    rows of the global batch.

        q_i = softmax(t_i / T),   p_i = softmax(s_i / T)
        L   = T^2 / N * sum_i sum_c q_ic (log q_ic - log p_ic)

    The T^2 keeps the soft targets' gradients on the scale of the hard-label cross-entropy's when T
    changes (Hinton et al. 2015, section 2). This is mdistiller's ``kd_loss``
    (megvii-research/mdistiller, ``mdistiller/distillers/KD.py``); its CIFAR-100 defaults are T = 4
    with ``0.1 * CE + 0.9 * kd_loss`` (``mdistiller/engine/cfg.py``), which the ``KD`` method applies.

    No label is needed: unlabelled rows (label -1) keep this term, only the cross-entropy beside it
    masks them. The teacher's logits are targets: no gradient flows into them. A teacher probability
    of exactly 0 (a logit of -inf, a one-hot soft label) contributes 0 (0 log 0 = 0).

    Under DDP the sum and the row count are all-reduced (one collective), so every rank returns the
    mean over the global batch and gradients follow ``ssl_lightning.distributed``'s convention, also
    for uneven shards.

    Args:
        student_logits: [N, C] student class scores.
        teacher_logits: [N, C] teacher class scores (same classes).
        temperature: T > 0 (mdistiller's CIFAR default 4).

    Returns:
        The scalar loss, in float32 or the inputs' wider dtype.
    """
    check_distillation_inputs("kd_loss", student_logits, teacher_logits, temperature)
    # Half-precision softmaxes lose the small probabilities that carry the teacher's "dark knowledge".
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    with torch.autocast(student_logits.device.type, enabled=False):
        log_p = torch.log_softmax(student_logits.to(dtype) / temperature, dim=1)
        q = torch.softmax(teacher_logits.detach().to(dtype) / temperature, dim=1)
        per_row = (torch.xlogy(q, q) - q * log_p).sum(dim=1)
        loss_sum, count = all_reduce_sum(torch.stack([per_row.sum(), torch.ones_like(per_row).sum()]))
        return temperature**2 * loss_sum / count.clamp(min=1)
