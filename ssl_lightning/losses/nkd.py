"""Normalized knowledge distillation, NKD (Yang, Zeng, Li, Zhang, Yuan and Li, ICCV 2023, "From
Knowledge Distillation to Self-Knowledge Distillation: A Unified Approach with Normalized Loss and
Customized Soft Labels")."""

from __future__ import annotations

import torch
from torch import Tensor

from ssl_lightning.distributed import all_reduce_sum
from ssl_lightning.losses._checks import check_distillation_inputs


def nkd_terms(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    temperature: float = 1.0,
    keep_target_in_non_target: bool = False,
) -> tuple[Tensor, Tensor]:
    """NKD's target term and its (unweighted) normalised non-target term, each averaged over the
    labelled rows of the global batch.

    With S = softmax(s), T = softmax(t) for an image of class y, and at temperature lambda:

        target      = - T_y log S_y                                          (no temperature)
        non_target  = - lambda^2 sum_{i != y} N(T^lambda)_i log N(S^lambda)_i

    where N(P)_i = P_i / sum_{j != y} P_j renormalises the non-target probabilities to sum to 1, i.e.
    a softmax over the C - 1 non-target logits divided by lambda (the paper's eq. for L_NKD; the
    official code, yzd-v/cls_KD ``mmcls/models/dis_losses/nkd.py``, takes the target column out of
    both logit matrices). ``nkd_loss`` weighs them ``target + gamma * non_target``.

    ``keep_target_in_non_target=True`` reproduces cls_KD's code before its commit 9466b3f
    (2023-10-10, "Update nkd.py"): its mask was ``ones.scatter_(1, label, 1)``, all ones, so the
    "non-target" softmax ran over all C classes, target included. The fix (``scatter_(1, label, 0)``)
    matches the paper, and is the default here.

    Rows labelled -1 (unlabelled) have no target class and are masked out: the terms are means over
    the labelled rows of the global batch (the official code averages over its all-labelled batch:
    the same there), 0 with a graph when no row is labelled; one collective all-reduces the sums and
    the count (``ssl_lightning.distributed``'s convention). The teacher's logits are targets: no
    gradient flows into them. With one class the non-target term is 0 (there is no non-target class).

    Args:
        student_logits: [N, C] student class scores.
        teacher_logits: [N, C] teacher class scores.
        labels: [N] class indices, -1 where unlabelled.
        temperature: lambda > 0 of the non-target term (the paper's and cls_KD's default 1).
        keep_target_in_non_target: the pre-fix reference behaviour described above.

    Returns:
        (target, non_target) as scalars, in float32 or the inputs' wider dtype.
    """
    check_distillation_inputs("nkd", student_logits, teacher_logits, temperature, labels)
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    with torch.autocast(student_logits.device.type, enabled=False):
        s, t = student_logits.to(dtype), teacher_logits.detach().to(dtype)
        labelled = (labels >= 0).to(dtype)
        target = labels.clamp(min=0).long().unsqueeze(1)
        target_rows = -(torch.softmax(t, 1).gather(1, target) * torch.log_softmax(s, 1).gather(1, target)).squeeze(1)
        if not keep_target_in_non_target:
            # The C - 1 other columns of each row, in order, by a gather (no boolean-mask selection,
            # which would sync the host): column j for j < y, column j + 1 for j >= y.
            columns = torch.arange(s.shape[1] - 1, device=s.device).unsqueeze(0)
            others = columns + (columns >= target).long()
            s, t = s.gather(1, others), t.gather(1, others)
        log_p = torch.log_softmax(s / temperature, dim=1)
        q = torch.softmax(t / temperature, dim=1)
        non_target_rows = -temperature**2 * (q * log_p).sum(dim=1)
        sums = all_reduce_sum(torch.stack([(target_rows * labelled).sum(), (non_target_rows * labelled).sum(),
                                           labelled.sum()]))
        count = sums[2].clamp(min=1)
        return sums[0] / count, sums[1] / count


def nkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    temperature: float = 1.0,
    gamma: float = 1.5,
    keep_target_in_non_target: bool = False,
) -> Tensor:
    """``target + gamma * non_target`` (see :func:`nkd_terms`): the official ``NKDLoss`` (yzd-v/cls_KD,
    ``loss_t + loss_non`` with gamma inside ``loss_non``), defaults temperature 1 and gamma 1.5 (its
    ImageNet setting, ``configs/distillers/imagenet/res34_distill_res18_img.py``). The ``NKD`` method
    adds the student's cross-entropy with weight 1, as cls_KD's distiller keeps its ``ori_loss``."""
    target, non_target = nkd_terms(student_logits, teacher_logits, labels, temperature, keep_target_in_non_target)
    return target + gamma * non_target
