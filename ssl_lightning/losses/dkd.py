"""Decoupled knowledge distillation, DKD (Zhao, Cui, Song, Qiu and Liang, CVPR 2022): KD split into a
target-class term (TCKD) and a non-target-class term (NCKD), weighted separately."""

from __future__ import annotations

import torch
from torch import Tensor

from ssl_lightning.distributed import all_reduce_sum
from ssl_lightning.losses._checks import check_distillation_inputs

#: mdistiller's offset that takes the target class out of a softmax (exp(-1000) is 0 in float32 and 64)
TARGET_OFFSET = 1000.0


def decoupled_kd_terms(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, temperature: float = 4.0
) -> tuple[Tensor, Tensor]:
    """DKD's two terms, TCKD and NCKD, each averaged over the labelled rows of the global batch.

    With p = softmax(s / T) and q = softmax(t / T) for an image of class y:

        b = [p_y, 1 - p_y]                     (target vs every other class; b^T likewise from q)
        TCKD = T^2 KL(b^T || b)
        NCKD = T^2 KL(q_{-y} / (1 - q_y) || p_{-y} / (1 - p_y))    (the distribution over the C - 1
                                                                 non-target classes)

    As in mdistiller (megvii-research/mdistiller, ``mdistiller/distillers/DKD.py``): the target mask
    from the label, the non-target distribution as a softmax of ``logits / T - 1000 * mask`` (the
    target's probability underflows to exactly 0), the KLs summed over their entries and scaled by
    T^2. One difference in arithmetic, not in value: the binary distributions are formed in log space
    (log-sum-exp over the non-target logits, with the same -1000 offset) where mdistiller takes the
    log of summed probabilities, so a student whose non-target probability underflows, or a single
    class (no non-target class: both terms are 0), gives a finite loss where mdistiller's log(0)
    gives an infinite loss or NaN. Logits must be finite.

    Rows labelled -1 (unlabelled) have no target class and are masked out: the terms are means over
    the labelled rows of the global batch (mdistiller, whose batches are all labelled, divides by the
    batch size: the same there), 0 with a graph when no row is labelled. The sums and the count are
    all-reduced in one collective (``ssl_lightning.distributed``'s convention). The teacher's logits
    are targets: no gradient flows into them.

    Args:
        student_logits: [N, C] student class scores.
        teacher_logits: [N, C] teacher class scores.
        labels: [N] class indices, -1 where unlabelled.
        temperature: T > 0 (DKD's CIFAR-100 default 4).

    Returns:
        (TCKD, NCKD) as scalars, in float32 or the inputs' wider dtype.
    """
    check_distillation_inputs("dkd", student_logits, teacher_logits, temperature, labels)
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    with torch.autocast(student_logits.device.type, enabled=False):
        s = student_logits.to(dtype) / temperature
        t = teacher_logits.detach().to(dtype) / temperature
        labelled = (labels >= 0).to(dtype)
        # A scatter, not one_hot: one_hot checks the label range on the host (a sync on the GPU).
        target_mask = torch.zeros_like(s).scatter_(1, labels.clamp(min=0).long().unsqueeze(1), 1.0)
        offset = TARGET_OFFSET * target_mask

        def log_binary(z: Tensor) -> Tensor:  # [log b_target, log b_other] per row
            total = torch.logsumexp(z, dim=1)
            return torch.stack([(z * target_mask).sum(1) - total, torch.logsumexp(z - offset, dim=1) - total], 1)

        def kl_rows(log_q: Tensor, log_p: Tensor) -> Tensor:  # log_q, log_p finite: 0 * finite = 0
            return (log_q.exp() * (log_q - log_p)).sum(dim=1)

        tckd_rows = kl_rows(log_binary(t), log_binary(s))
        nckd_rows = kl_rows(torch.log_softmax(t - offset, dim=1), torch.log_softmax(s - offset, dim=1))
        sums = all_reduce_sum(torch.stack([(tckd_rows * labelled).sum(), (nckd_rows * labelled).sum(), labelled.sum()]))
        scale = temperature**2 / sums[2].clamp(min=1)
        return sums[0] * scale, sums[1] * scale


def dkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
) -> Tensor:
    """``alpha * TCKD + beta * NCKD`` (see :func:`decoupled_kd_terms`); DKD's CIFAR-100 defaults
    alpha 1, beta 8, T 4 (mdistiller's ``CFG.DKD``). The ``DKD`` method adds ``ce_weight * CE`` and
    warms this term up over the first epochs."""
    tckd, nckd = decoupled_kd_terms(student_logits, teacher_logits, labels, temperature)
    return alpha * tckd + beta * nckd
