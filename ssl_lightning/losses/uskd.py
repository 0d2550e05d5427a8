"""Universal self-knowledge distillation, USKD (Yang, Zeng, Li, Zhang, Yuan and Li, ICCV 2023, "From
Knowledge Distillation to Self-Knowledge Distillation: A Unified Approach with Normalized Loss and
Customized Soft Labels"): NKD's normalised loss with soft labels the student makes itself, no teacher.

Follows the official ``USKDLoss`` (yzd-v/cls_KD, ``mmcls/models/dis_losses/uskd.py``)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from ssl_lightning.distributed import all_reduce_sum
from ssl_lightning.losses._checks import check_paired_rows

RANK_SOURCES = ("weak_and_final", "final")

#: the code's guard in the rank score's denominators, ``1 - p_y + 1e-6``
RANK_EPS = 1e-6


def non_target_columns(labels: Tensor, num_classes: int) -> Tensor:
    """[N, C - 1] indices of each row's non-target classes in class order: column j for j < y, j + 1
    for j >= y. A gather with them selects without a boolean mask (which would sync the host); rows
    labelled -1 take class 0 as their (masked) target."""
    columns = torch.arange(num_classes - 1, device=labels.device).unsqueeze(0)
    target = labels.clamp(min=0).long().unsqueeze(1)
    return columns + (columns >= target).long()


def rank_scores(logits: Tensor, weak_logits: Tensor, labels: Tensor,
                rank_by: Literal["weak_and_final", "final"] = "weak_and_final") -> Tensor:
    """[N, C] scores whose descending order ranks the classes for the Zipf labels (no gradient).

    ``"weak_and_final"``, the official code's score (its ``rank``):

        W_i / (1 - W_y + 1e-6) + log S_i / (1 - log S_y + 1e-6)

    W = softmax of the weak head, S = softmax of the final logits. The code's ``s_i`` holds the
    log-softmax by that line (it is reassigned for the target term), so the final part is in log
    probabilities; we keep the code's score, since its results come from it. ``"final"``: the final
    logits alone (the student's own prediction order, the same as S's).
    """
    if rank_by not in RANK_SOURCES:
        raise ValueError(f"uskd: rank_by must be one of {RANK_SOURCES}, got {rank_by!r}.")
    logits = logits.detach()
    if rank_by == "final":
        return logits
    target = labels.clamp(min=0).long().unsqueeze(1)
    weak = torch.softmax(weak_logits.detach(), dim=1)
    log_s = torch.log_softmax(logits, dim=1)
    return weak / (1 - weak.gather(1, target) + RANK_EPS) + log_s / (1 - log_s.gather(1, target) + RANK_EPS)


def zipf_non_target_labels(scores: Tensor, labels: Tensor, keep_target_in_non_target: bool = False) -> Tensor:
    """[N, C - 1] soft non-target labels, over each row's non-target classes in class order
    (:func:`non_target_columns`): Zipf's law over the classes ranked by ``scores`` (descending), the
    class at rank k (from 1) weighted 1 / k, then normalised to sum to 1 over the non-target classes.

    Default (the paper): the ranks are those among the C - 1 non-target classes, so the weights are
    1, 1/2, ..., 1/(C - 1) before normalising. ``keep_target_in_non_target=True`` (the official code):
    the ranks are taken over all C classes, the target included, and the target's weight is then
    dropped, so a target ranked above some non-target class shifts their ranks by one (the code's
    ``zipf`` of length C, gathered by rank, then masked).

    Ties keep class order (a stable sort; the code's ``torch.sort`` is not stable). No gradient.
    """
    scores = scores.detach()
    num_classes = scores.shape[1]
    others = non_target_columns(labels, num_classes)
    if not keep_target_in_non_target:
        scores = scores.gather(1, others)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    position = torch.argsort(order, dim=1)  # each class's place in the order, 0 = first
    weights = 1.0 / (position + 1).to(scores.dtype)
    if keep_target_in_non_target:
        weights = weights.gather(1, others)
    return weights / weights.sum(dim=1, keepdim=True)


def uskd_terms(
    logits: Tensor,
    weak_logits: Tensor,
    labels: Tensor,
    keep_target_in_non_target: bool = False,
    rank_by: Literal["weak_and_final", "final"] = "weak_and_final",
    weak_label_smoothing: float = 0.1,
) -> tuple[Tensor, Tensor, Tensor]:
    """USKD's target, non-target and weak terms (unweighted), each a mean over the labelled rows of
    the global batch.

    With S = softmax(logits), W = softmax(weak_logits) for an image of class y (C classes):

        target      = - V_y log S_y,   V_y = S_y^2 + 1 - mean_batch(S_y^2)          (V detached)
        non_target  = - sum_{i != y} Z_i log N(S)_i                                  (Z detached)
        weak        = - sum_i [(1 - eps) 1{i = y} + eps / C] log W_i                 (eps = 0.1)

    V is the squared-target soft label, shifted so that its batch mean is 1 (the code's
    ``p_t = s_t**2 + value - p_t.mean(0)``, value 1 for a hard label). N(S) is the softmax over the
    C - 1 non-target logits (target excluded, in the paper and the code alike); Z the Zipf labels
    (:func:`zipf_non_target_labels`) over the classes ranked by :func:`rank_scores`. ``weak`` is the
    weak head's cross-entropy with labels smoothed by ``weak_label_smoothing`` (the code's 0.9 / 0.1).
    The official ``USKDLoss`` returns ``alpha * target + beta * non_target + mu * weak``.

    Rows labelled -1 have no target class and leave every term (also the batch mean of S_y^2); the
    terms are 0 with a graph when no row is labelled. The batch is the global one: one collective
    all-reduces the sums and the count (``ssl_lightning.distributed``'s convention; the code's mean
    is over each GPU's batch). With one class every term is 0.

    Args:
        logits: [N, C] the final classifier's scores.
        weak_logits: [N, C] the weak (auxiliary) head's scores.
        labels: [N] class indices, -1 where unlabelled.
        keep_target_in_non_target: rank the target among the classes for the Zipf labels, as the
            official code does (see :func:`zipf_non_target_labels`); the non-target softmax excludes
            the target either way.
        rank_by: "weak_and_final" (the code's score) or "final" (see :func:`rank_scores`).
        weak_label_smoothing: eps of the weak head's smoothed labels, in [0, 1].

    Returns:
        (target, non_target, weak) as scalars, in float32 or the inputs' wider dtype.
    """
    check_paired_rows("uskd", logits, weak_logits, ("logits", "weak_logits"))
    if labels.shape != logits.shape[:1] or labels.is_floating_point():
        raise ValueError(f"uskd expects labels as an integer tensor of shape [N] = {tuple(logits.shape[:1])} "
                         f"(-1: unlabelled), got {labels.dtype} of shape {tuple(labels.shape)}")
    if not 0.0 <= weak_label_smoothing <= 1.0:
        raise ValueError(f"uskd: weak_label_smoothing must be in [0, 1] (the code's 0.1), got {weak_label_smoothing}.")
    dtype = torch.promote_types(torch.promote_types(logits.dtype, weak_logits.dtype), torch.float32)
    with torch.autocast(logits.device.type, enabled=False):
        s, w = logits.to(dtype), weak_logits.to(dtype)
        num_classes = s.shape[1]
        labelled = (labels >= 0).to(dtype)
        target = labels.clamp(min=0).long().unsqueeze(1)
        log_s = torch.log_softmax(s, dim=1)
        log_s_y = log_s.gather(1, target).squeeze(1)
        squared = log_s_y.detach().exp() ** 2
        # - mean_i (1 + a_i - m) l_i = -(sum (1 + a_i) l_i - m sum l_i) / n with m = sum a_i / n: all sums
        others = non_target_columns(labels, num_classes)
        zipf = zipf_non_target_labels(rank_scores(s, w, labels, rank_by), labels, keep_target_in_non_target)
        non_target_rows = -(zipf * torch.log_softmax(s.gather(1, others), dim=1)).sum(dim=1)
        log_w = torch.log_softmax(w, dim=1)
        weak_rows = -((1 - weak_label_smoothing) * log_w.gather(1, target).squeeze(1)
                      + weak_label_smoothing / num_classes * log_w.sum(dim=1))
        sums = all_reduce_sum(torch.stack([
            ((1 + squared) * log_s_y * labelled).sum(), (squared * labelled).sum(), (log_s_y * labelled).sum(),
            (non_target_rows * labelled).sum(), (weak_rows * labelled).sum(), labelled.sum(),
        ]))
        count = sums[5].clamp(min=1)
        mean_squared = sums[1] / count
        target_term = -(sums[0] - mean_squared * sums[2]) / count
        return target_term, sums[3] / count, sums[4] / count


def uskd_loss(
    logits: Tensor,
    weak_logits: Tensor,
    labels: Tensor,
    alpha: float = 0.1,
    beta: float = 0.1,
    mu: float = 0.1,
    keep_target_in_non_target: bool = False,
    rank_by: Literal["weak_and_final", "final"] = "weak_and_final",
    weak_label_smoothing: float = 0.1,
) -> Tensor:
    """``alpha * target + beta * non_target + mu * weak`` (see :func:`uskd_terms`): the official
    ``USKDLoss`` (``loss_uskd``), with its CIFAR-100 weights (``configs/distillers/cifar100/res18_sd_cifar.py``:
    alpha 0.1, beta 0.1, mu 0.1; its ImageNet ones, ``USKDLoss``'s defaults and
    ``configs/distillers/imagenet/res18_sd_img.py``, are alpha 1, beta 0.1, mu 0.005). The ``USKD``
    method adds the cross-entropy with weight 1, as cls_KD's distiller keeps its ``ori_loss``."""
    target, non_target, weak = uskd_terms(logits, weak_logits, labels, keep_target_in_non_target, rank_by,
                                          weak_label_smoothing)
    return alpha * target + beta * non_target + mu * weak
