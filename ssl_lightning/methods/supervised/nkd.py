"""NKD (Yang, Zeng, Li, Zhang, Yuan and Li, ICCV 2023, "From Knowledge Distillation to Self-Knowledge
Distillation: A Unified Approach with Normalized Loss and Customized Soft Labels"): KD with the
teacher's target probability as a weight and normalised non-target distributions."""

from __future__ import annotations

from typing import Any

from ssl_lightning.losses import labelled_cross_entropy
from ssl_lightning.losses.nkd import nkd_terms
from ssl_lightning.methods.supervised.distillation import DistillationStudent


class NKD(DistillationStudent):
    """Normalized knowledge distillation from a frozen classifier teacher:

        loss = ce_weight * CE(s, y) + [ -T_y log S_y ] + gamma * [ -lambda^2 sum_{i != y} N(T^l)_i log N(S^l)_i ]

    S, T are the student's and the teacher's softmax on the same augmented view (the teacher online,
    under no_grad), N renormalises the non-target probabilities, computed at temperature lambda
    (``losses.nkd.nkd_terms``). The target term has weight 1 and no temperature; gamma multiplies
    the non-target term (lambda^2 inside it). The cross-entropy with weight 1 is the official
    distiller's ``ori_loss`` beside ``loss_nkd`` (yzd-v/cls_KD,
    ``mmcls/distillation/distillers/classification_distiller.py``). Defaults are the paper's and the
    official ``NKDLoss``'s: temperature 1, gamma 1.5 (its ImageNet configs; its CIFAR-100 config
    ``configs/distillers/cifar100/res34_distill_res18_cifar.py`` uses temperature 3, gamma 3.5).

    ``keep_target_in_non_target``: the non-target softmax follows the paper and excludes the target
    class (cls_KD since commit 9466b3f, 2023-10-10); True keeps it in, as cls_KD's code did before
    that fix (see ``losses.nkd.nkd_terms``).

    Unlabelled rows (label -1) have no target class: the CE and both NKD terms mask them.

    Logged terms: ``loss/ce``, ``loss/target``, ``loss/non_target`` (unweighted). The teacher: see
    :class:`KD`'s arguments and :class:`~ssl_lightning.components.frozen_teacher.FrozenTeacher`.

    Args:
        temperature: lambda, the temperature of the non-target term.
        gamma: weight of the non-target term.
        ce_weight: weight of the cross-entropy with the labels.
        keep_target_in_non_target: the pre-fix reference behaviour (see above).
        **kwargs: the teacher's arguments (``teacher_ckpt``, ``teacher_timm``, ...: see
            :class:`~ssl_lightning.methods.supervised.distillation.DistillationStudent`) and the backbone, data,
            optimizer and schedule arguments of :class:`SupervisedMethod`.
    """

    def __init__(
        self,
        temperature: float = 1.0,
        gamma: float = 1.5,
        ce_weight: float = 1.0,
        keep_target_in_non_target: bool = False,
        **kwargs: Any,
    ):
        if temperature <= 0:
            raise ValueError(f"NKD: temperature must be > 0, got {temperature}.")
        super().__init__(**kwargs)

    def shared_step(self, batch: dict) -> dict:
        hp = self.hparams
        images, labels = batch["views"][0], batch["label"]
        feats = self.backbone(images)
        logits = self.head(feats)
        ce = labelled_cross_entropy(logits, labels)
        target, non_target = nkd_terms(logits, self.teacher_logits(batch), labels, hp.temperature,
                                       hp.keep_target_in_non_target)
        loss = hp.ce_weight * ce + target + hp.gamma * non_target
        return {"loss": loss, "loss/ce": ce, "loss/target": target, "loss/non_target": non_target, "feats": feats,
                "logits": logits}
