"""Self-supervised label augmentation, SLA (Lee, Hwang and Shin, ICML 2020, "Self-supervised Label
Augmentation via Input Transformations"): the joint (class x rotation) cross-entropy and SLA+SD's
self-distillation of a single-label head from the aggregated joint prediction."""

from __future__ import annotations

import torch
from torch import Tensor

from ssl_lightning.components.rotation import NUM_ROTATIONS, aggregated_logits, joint_labels
from ssl_lightning.losses.cross_entropy import labelled_cross_entropy
from ssl_lightning.losses.kd import kd_loss


def sla_joint_loss(joint_logits: Tensor, labels: Tensor) -> Tensor:
    """SLA's loss: the cross-entropy of the joint logits of the rotated batch with the joint labels,

        L_SLA = 1 / (4 B) sum_i sum_j CE(z(t_j(x_i)), 4 y_i + j)

    the paper's L_SLA averaged over the M = 4 rotations, the official ``F.cross_entropy(preds, labels)``
    (hankook/SLA ``trainers.py`` ``create_sla_trainer``). Rows of unlabelled images (-1) are masked; the
    mean is over the labelled rows of the global batch (``labelled_cross_entropy``).

    Args:
        joint_logits: ``[4 B, 4 C]`` joint logits of ``rotate_batch(images)``.
        labels: ``[B]`` class labels of the un-rotated images, -1 where unlabelled.
    """
    _check_rows("sla_joint_loss", joint_logits, labels)
    with torch.autocast(joint_logits.device.type, enabled=False):
        return labelled_cross_entropy(_float(joint_logits), joint_labels(labels))


def sla_sd_terms(
    joint_logits: Tensor, single_logits: Tensor, labels: Tensor, temperature: float = 1.0
) -> tuple[Tensor, Tensor, Tensor]:
    """SLA+SD's three terms (the official ``create_sla_sd_trainer`` in hankook/SLA ``trainers.py``):

        joint   = L_SLA (:func:`sla_joint_loss`)
        single  = CE(u(x), y)                                  the single-label head on the un-rotated image
        distill = T^2 KL(softmax(a(x) / T) || softmax(u(x) / T))

    with a(x) = 1/4 sum_j z_(., j)(t_j(x)) the aggregated joint logits (SLA+AG's prediction, detached:
    the target) and u the single-label head. The official loss is ``joint + single + T^2 distill``
    with ``F.kl_div(..., reduction="batchmean")`` and T = 1; ``distill`` here includes the T^2.

    Unlabelled rows (-1) are masked out of both cross-entropies; the distillation term needs no label
    and keeps them (as ``kd_loss``: the aggregated prediction is the target). Each term is a mean over
    the global batch (labelled rows for the cross-entropies), all-reduced under DDP.

    Args:
        joint_logits: ``[4 B, 4 C]`` joint logits of the rotated batch.
        single_logits: ``[B, C]`` single-label head logits of the un-rotated images (rows ``0::4`` of the
            rotated batch).
        labels: ``[B]`` class labels, -1 where unlabelled.
        temperature: T > 0 of the distillation (the paper's and the code's 1).

    Returns:
        ``(joint, single, distill)`` scalars in float32 (or the inputs' wider dtype).
    """
    _check_rows("sla_sd_terms", joint_logits, labels)
    if single_logits.dim() != 2 or single_logits.shape[0] != labels.shape[0] or \
            single_logits.shape[1] * NUM_ROTATIONS != joint_logits.shape[1]:
        raise ValueError(
            f"sla_sd_terms expects single_logits [B, C] = "
            f"[{labels.shape[0]}, {joint_logits.shape[1] // NUM_ROTATIONS}] "
            f"(one row per un-rotated image, one column per class), got {tuple(single_logits.shape)}"
        )
    with torch.autocast(joint_logits.device.type, enabled=False):
        joint_logits, single_logits = _float(joint_logits), _float(single_logits)
        joint = labelled_cross_entropy(joint_logits, joint_labels(labels))
        single = labelled_cross_entropy(single_logits, labels)
        distill = kd_loss(single_logits, aggregated_logits(joint_logits).detach(), temperature)
        return joint, single, distill


def sla_sd_loss(joint_logits: Tensor, single_logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """``joint + single + distill`` (:func:`sla_sd_terms`), every weight 1 as in the official code."""
    return sum(sla_sd_terms(joint_logits, single_logits, labels, temperature))


def _check_rows(loss: str, joint_logits: Tensor, labels: Tensor) -> None:
    if labels.dim() != 1 or labels.is_floating_point() or joint_logits.dim() != 2 or \
            joint_logits.shape[0] != NUM_ROTATIONS * labels.shape[0] or joint_logits.shape[1] % NUM_ROTATIONS:
        raise ValueError(
            f"{loss} expects joint_logits [4 B, 4 C] of rotate_batch(images) and integer labels [B] of the "
            f"images, got {tuple(joint_logits.shape)} and {labels.dtype} {tuple(labels.shape)}"
        )


def _float(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))
