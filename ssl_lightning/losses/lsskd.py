"""Layered self-supervised knowledge distillation, LSSKD (Dahri et al. 2025, "A Layered Self-Supervised
Knowledge Distillation Framework for Efficient Multimodal Learning on the Edge", arXiv 2506.07055): a
classifier trained with rotation-augmented (class x rotation) auxiliary classifiers after its stages,
distilled across layers. See ``methods.supervised.lsskd`` for what follows which source."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ssl_lightning.components.rotation import NUM_ROTATIONS, joint_labels, per_rotation_class_logits
from ssl_lightning.distributed import all_reduce_sum
from ssl_lightning.losses.cross_entropy import labelled_cross_entropy
from ssl_lightning.losses.kd import kd_loss


def lsskd_terms(
    logits: Tensor,
    aux_joint_logits: Sequence[Tensor],
    feats: Tensor,
    aux_feats: Sequence[Tensor],
    labels: Tensor,
    temperature: float = 3.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """LSSKD's four terms, for L auxiliary classifiers l on the rotated batch (row ``4 i + j``: image i
    rotated j quarter turns, ``components.rotation``):

        ce      = CE(f(x_i), y_i)                                   the final classifier, un-rotated images
        joint   = sum_l CE(c_l(t_j(x_i)), 4 y_i + j)                 each auxiliary classifier's joint labels
        kl      = sum_l T^2 KL(softmax(f(x_i) / T) || softmax(c_l(t_j(x_i))_(., j) / T))
        feature = sum_l mean_(rows, dims) (h_l(t_j(x_i)) - phi(t_j(x_i)))^2

    f is the final classifier, c_l the l-th auxiliary joint classifier and c_l(.)_(., j) its class logits
    at the input's own rotation j (SLA's reading), h_l the auxiliary branch's feature, phi the backbone's
    pooled feature of the same rotated input. The final classifier's distribution and the backbone's
    features are targets (detached): the deepest output teaches the shallower branches, as in BYOT
    (Zhang et al. 2019, luanyunteng/pytorch-be-your-own-teacher ``train.py``), and each rotated copy of
    an image is taught the final classifier's distribution of the un-rotated image (its class does not
    change with the rotation). The joint term is HSAKD's self-supervised augmented task (winycg/HSAKD
    ``train_teacher_cifar.py``: ``criterion_cls(ss_logits[i], labels)`` summed over the branches).

    Rows of unlabelled images (-1) leave both cross-entropies; the KL and feature terms need no label and
    keep them. Every term is a mean over the global batch (labelled rows for the cross-entropies,
    ``ssl_lightning.distributed``'s convention); sums run over the auxiliary classifiers.

    Args:
        logits: ``[B, C]`` final classifier logits of the un-rotated images (rows ``0::4`` of the batch).
        aux_joint_logits: L tensors ``[4 B, 4 C]``, the auxiliary classifiers' joint logits.
        feats: ``[4 B, D]`` the backbone's features of the rotated batch.
        aux_feats: L tensors ``[4 B, D]``, the auxiliary branches' features.
        labels: ``[B]`` class labels, -1 where unlabelled.
        temperature: T > 0 of the KL (BYOT's and HSAKD's 3).

    Returns:
        ``(ce, joint, kl, feature)`` scalars in float32 (or the inputs' wider dtype).
    """
    _check(logits, aux_joint_logits, feats, aux_feats, labels, temperature)
    dtype = torch.promote_types(logits.dtype, torch.float32)
    with torch.autocast(logits.device.type, enabled=False):
        logits, feats = logits.to(dtype), feats.detach().to(dtype)
        ce = labelled_cross_entropy(logits, labels)
        rows, classes = feats.shape[0], logits.shape[1]
        # the un-rotated image's distribution, for each of its rotated rows
        teacher = logits.detach().unsqueeze(1).expand(-1, NUM_ROTATIONS, -1).reshape(rows, classes)
        targets = joint_labels(labels)
        joint, kl, squares = ce.new_zeros(()), ce.new_zeros(()), ce.new_zeros(())
        for aux_logits, aux_feat in zip(aux_joint_logits, aux_feats, strict=True):
            aux_logits = aux_logits.to(dtype)
            joint = joint + labelled_cross_entropy(aux_logits, targets)
            at_own_rotation = per_rotation_class_logits(aux_logits).reshape(rows, classes)
            kl = kl + kd_loss(at_own_rotation, teacher, temperature)
            squares = squares + (aux_feat.to(dtype) - feats).square().sum()
        squared_sum, count = all_reduce_sum(torch.stack([squares, squares.new_tensor(float(feats.numel()))]))
        return ce, joint, kl, squared_sum / count


def _check(logits, aux_joint_logits, feats, aux_feats, labels, temperature) -> None:
    if labels.dim() != 1 or labels.is_floating_point() or logits.dim() != 2 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"lsskd_terms expects logits [B, C] and integer labels [B], got {tuple(logits.shape)} and "
                         f"{labels.dtype} {tuple(labels.shape)}")
    rows, classes = NUM_ROTATIONS * labels.shape[0], logits.shape[1]
    if feats.dim() != 2 or feats.shape[0] != rows:
        raise ValueError(f"lsskd_terms expects feats [4 B, D] of the rotated batch = [{rows}, D], "
                         f"got {tuple(feats.shape)}")
    if not aux_joint_logits or len(aux_joint_logits) != len(aux_feats):
        raise ValueError(f"lsskd_terms expects one feature per auxiliary classifier and at least one of them, got "
                         f"{len(aux_joint_logits)} joint logits and {len(aux_feats)} features")
    for aux_logits, aux_feat in zip(aux_joint_logits, aux_feats):
        if tuple(aux_logits.shape) != (rows, NUM_ROTATIONS * classes) or aux_feat.shape != feats.shape:
            raise ValueError(
                f"lsskd_terms expects each auxiliary classifier's joint logits [4 B, 4 C] = [{rows}, "
                f"{NUM_ROTATIONS * classes}] and features shaped as feats {tuple(feats.shape)}, got "
                f"{tuple(aux_logits.shape)} and {tuple(aux_feat.shape)}"
            )
    if temperature <= 0:
        raise ValueError(f"lsskd_terms needs temperature > 0, got {temperature}")
