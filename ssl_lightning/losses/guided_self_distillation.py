"""Self-distillation guided by the ground truth (Borup and Andersen, NeurIPS 2021, "Even your Teacher Needs
Guidance: Ground-Truth Targets Dampen Regularization Imposed by Self-Distillation")."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from ssl_lightning.distributed import all_reduce_sum
from ssl_lightning.losses._checks import check_paired_rows

Objective = Literal["mse", "cross_entropy"]
OBJECTIVES = ("mse", "cross_entropy")


def guided_self_distillation_terms(student_logits: Tensor, teacher_logits: Tensor | None, labels: Tensor,
                                   objective: Objective = "mse") -> dict[str, Tensor]:
    """The two unweighted terms of the guided self-distillation loss: ``"labels"``, the fit to the
    ground truth, averaged over the labelled rows of the global batch, and, with a teacher,
    ``"teacher"``, the fit to the previous round's predictions, averaged over all rows.

    With p = softmax(s) the student's probabilities, q = softmax(t) the teacher's (no temperature:
    the official code, Kennethborup/self_distillation ``self_distiller.py``, softmaxes both at T = 1)
    and e_y the one-hot label of a row:

        objective "mse" (the paper's, and the official code's ``F.mse_loss(F.softmax(pred), target)``):
            labels  = 1/C sum_c (p_c - e_y,c)^2         teacher = 1/C sum_c (p_c - q_c)^2
        objective "cross_entropy":
            labels  = - log p_y                         teacher = - sum_c q_c log p_c

    Rows labelled -1 have no ground truth: they leave the label term (masked, not selected, so no
    host sync) and keep the teacher term, which needs no label; a batch without labels gives a label
    term of 0 with a graph. The sums and the row counts are all-reduced in one collective, so every
    rank returns the global batch's means (``ssl_lightning.distributed``'s convention). The teacher's
    logits are targets: no gradient flows into them.

    Args:
        student_logits: [N, C] student class scores.
        teacher_logits: [N, C] class scores of the previous round's model, or None (round 0).
        labels: [N] integer class indices, -1 where unlabelled.
        objective: "mse" or "cross_entropy", as above.

    Returns:
        ``{"labels": ...}`` and, with a teacher, ``"teacher"``: scalars in float32 or the inputs'
        wider dtype.
    """
    _check_inputs(student_logits, teacher_logits, labels, objective)
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    # Half-precision softmaxes lose the small probabilities the soft targets carry.
    with torch.autocast(student_logits.device.type, enabled=False):
        s = student_logits.to(dtype)
        labelled = (labels >= 0).to(dtype)
        # scatter, not F.one_hot, which checks the labels' range on the host
        one_hot = torch.zeros_like(s).scatter_(1, labels.clamp(min=0).long().unsqueeze(1), 1.0)
        label_rows = _per_row(s, one_hot, objective)
        sums = [(label_rows * labelled).sum(), labelled.sum()]
        if teacher_logits is not None:
            teacher_probs = torch.softmax(teacher_logits.detach().to(dtype), dim=1)
            teacher_rows = _per_row(s, teacher_probs, objective)
            sums += [teacher_rows.sum(), torch.ones_like(teacher_rows).sum()]
        sums = all_reduce_sum(torch.stack(sums))
        terms = {"labels": sums[0] / sums[1].clamp(min=1)}
        if teacher_logits is not None:
            terms["teacher"] = sums[2] / sums[3].clamp(min=1)
        return terms


def guided_self_distillation_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, alpha: float = 0.6,
                                  objective: Objective = "mse") -> Tensor:
    """Borup and Andersen's distillation step: the student fits the ground truth with weight alpha and
    the previous round's predictions with weight 1 - alpha,

        L = alpha * labels + (1 - alpha) * teacher          (terms of ``guided_self_distillation_terms``)

    alpha multiplies the ground-truth term, 1 - alpha the teacher term: the paper's weighted squared-error
    objective of a step tau >= 1, ``alpha ||y - f(x)||^2 + (1 - alpha) ||f_(tau-1)(x) - f(x)||^2`` (plus an
    l2 regulariser, left to the optimizer here), which the official code writes as
    ``loss = alpha * mse(p, y) + (1 - alpha) * mse(p, q)`` (Kennethborup/self_distillation
    ``self_distiller.py``, ``LitResnet.training_step``). Its README's CIFAR-10 command uses alpha 0.6 and
    5 distillation steps.

    This is a weighted sum of two losses; against one mixed target m = alpha e_y + (1 - alpha) q:

    * cross-entropy is linear in its target, so ``alpha CE(e_y) + (1 - alpha) CE(q) = CE(m)`` exactly,
      in value and gradient;
    * the squared error is not: ``alpha ||p - e_y||^2 + (1 - alpha) ||p - q||^2 = ||p - m||^2 +
      alpha (1 - alpha) ||e_y - q||^2``. The extra term does not depend on the student, so the
      gradients are equal, while the value here (the official code's) is larger by that constant.

    Both hold for a batch whose rows are all labelled; with unlabelled rows the label term is a mean
    over fewer rows than the teacher term (as KD's cross-entropy beside its soft term), and there is
    no single mixed target. alpha = 1 is plain training on the labels, alpha = 0 pure distillation.

    Args:
        student_logits: [N, C] student class scores.
        teacher_logits: [N, C] class scores of the previous round's model.
        labels: [N] integer class indices, -1 where unlabelled.
        alpha: weight of the ground-truth term, in [0, 1] (the paper's experiments: 0.6).
        objective: "mse" (the paper's) or "cross_entropy".

    Returns:
        The scalar loss, in float32 or the inputs' wider dtype.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"guided_self_distillation_loss: alpha weighs the labels against the teacher and must be in "
                         f"[0, 1], got {alpha}.")
    if teacher_logits is None:
        raise ValueError("guided_self_distillation_loss needs teacher_logits; for round 0 (no teacher) use "
                         "guided_self_distillation_terms(student_logits, None, labels)['labels'].")
    terms = guided_self_distillation_terms(student_logits, teacher_logits, labels, objective)
    return alpha * terms["labels"] + (1.0 - alpha) * terms["teacher"]


def _per_row(logits: Tensor, targets: Tensor, objective: Objective) -> Tensor:
    if objective == "mse":
        return (torch.softmax(logits, dim=1) - targets).square().mean(dim=1)
    # log_softmax of finite logits is finite, so a target probability of 0 (a one-hot label) contributes 0
    return -(targets * torch.log_softmax(logits, dim=1)).sum(dim=1)


def _check_inputs(student_logits: Tensor, teacher_logits: Tensor | None, labels: Tensor, objective: str) -> None:
    name = "guided_self_distillation"
    if objective not in OBJECTIVES:
        raise ValueError(f"{name}: objective must be one of {OBJECTIVES}, got {objective!r}.")
    if student_logits.dim() != 2:
        raise ValueError(f"{name} expects student_logits of shape [N, C], got {tuple(student_logits.shape)}.")
    if teacher_logits is not None:
        check_paired_rows(name, student_logits, teacher_logits, ("student_logits", "teacher_logits"))
    if labels.shape != student_logits.shape[:1] or labels.is_floating_point():
        raise ValueError(
            f"{name} expects labels as an integer tensor of shape [N] = {tuple(student_logits.shape[:1])} "
            f"(-1: unlabelled), got {labels.dtype} of shape {tuple(labels.shape)}."
        )
