"""Teacher-student consistency losses of test-time adaptation: CoTTA's soft cross-entropy to the
teacher, RMT's symmetric cross-entropy, and RMT's contrastive loss to the source prototypes.

Per process, as the rest of the TTA family: each returns per-image values or this process's mean, and
``TTAMethod.adapt_step`` averages the gradients over processes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_lightning.losses._checks import check_paired_rows


def symmetric_cross_entropy(logits: Tensor, teacher_logits: Tensor, alpha: float = 0.5) -> Tensor:
    """Per-image symmetric cross-entropy between a student and a teacher, ``[N, C], [N, C] -> [N]``:

        l_i = -(1 - alpha) sum_c q_ic log p_ic - alpha sum_c p_ic log q_ic,
        p = softmax(logits), q = softmax(teacher_logits)

    (Döbler et al., "Robust Mean Teacher for Continual and Gradual Test-Time Adaptation", CVPR 2023,
    Eq. 3; mariodoebler/test-time-adaptation ``classification/utils/losses.py``
    ``SymmetricCrossEntropy``, alpha 0.5). ``alpha = 0`` is the cross-entropy of the student to the
    teacher's soft prediction (CoTTA on CIFAR, ``softmax_entropy_cifar`` of the benchmark's
    ``methods/cotta.py``); CoTTA on ImageNet uses 0.5. Gradients flow into both arguments: pass
    teacher logits computed without gradients, as the methods do. Computed in float32 (or the
    inputs' wider dtype) with autocast off.
    """
    check_paired_rows("symmetric_cross_entropy", logits, teacher_logits, ("logits", "teacher_logits"))
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"symmetric_cross_entropy needs 0 <= alpha <= 1, got {alpha}")
    dtype = torch.promote_types(logits.dtype, torch.float32)
    with torch.autocast(logits.device.type, enabled=False):
        log_p = torch.log_softmax(logits.to(dtype), dim=1)
        log_q = torch.log_softmax(teacher_logits.to(dtype), dim=1)
        to_teacher = -(log_q.exp() * log_p).sum(dim=1)
        if alpha == 0.0:  # no second term: its 0 * (-inf) would be nan where a probability underflows
            return to_teacher
        return (1.0 - alpha) * to_teacher - alpha * (log_p.exp() * log_q).sum(dim=1)


def teacher_cross_entropy(logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Per-image cross-entropy of the student to the teacher's softmax, ``-sum_c q_ic log p_ic``:
    CoTTA's loss on CIFAR (Wang et al., "Continual Test-Time Domain Adaptation", CVPR 2022, Eq. 3);
    :func:`symmetric_cross_entropy` with ``alpha = 0``."""
    return symmetric_cross_entropy(logits, teacher_logits, alpha=0.0)


def prototype_contrastive_loss(prototypes: Tensor, features: Tensor, augmented: Tensor,
                               temperature: float = 0.1) -> Tensor:
    """RMT's contrastive loss between each test image, its augmented view and its nearest source
    prototype, all three already through the projector, ``3 x [N, D] -> scalar``.

    The 3N rows ``z`` are L2-normalised; every row is an anchor whose positives are the two other rows
    of the same image and whose contrast set is every row but itself (SupCon's multi-positive form,
    Khosla et al. 2020, with ``contrast_mode='all'`` and no labels, as the benchmark's
    ``RMT.contrastive_loss`` in ``classification/methods/rmt.py``):

        l_a = -1/2 sum_{p in P(a)} log( exp(z_a.z_p / T) / sum_{k != a} exp(z_a.z_k / T) )

    and the loss is the mean of ``l_a`` over the 3N anchors (the benchmark's factor
    ``temperature / base_temperature`` is 1). Prototype rows get gradients if the caller's do
    (the projector's); the source prototypes themselves are constants. Float32 inside, autocast off.
    """
    check_paired_rows("prototype_contrastive_loss", prototypes, features, ("prototypes", "features"))
    check_paired_rows("prototype_contrastive_loss", features, augmented, ("features", "augmented"))
    if temperature <= 0:
        raise ValueError(f"prototype_contrastive_loss needs temperature > 0, got {temperature}")
    n = features.shape[0]
    dtype = torch.promote_types(features.dtype, torch.float32)
    with torch.autocast(features.device.type, enabled=False):
        z = F.normalize(torch.cat([prototypes, features, augmented]).to(dtype), dim=1)
        similarity = z @ z.T / temperature
        itself = torch.eye(3 * n, dtype=torch.bool, device=z.device)
        log_prob = similarity - torch.logsumexp(similarity.masked_fill(itself, float("-inf")), dim=1, keepdim=True)
        image = torch.arange(3 * n, device=z.device) % n
        positive = (image[:, None] == image[None, :]) & ~itself
        return -(log_prob * positive).sum(dim=1).div(2.0).mean()
