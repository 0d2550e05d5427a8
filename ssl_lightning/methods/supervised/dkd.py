"""DKD (Zhao, Cui, Song, Qiu and Liang, CVPR 2022, "Decoupled Knowledge Distillation"): KD split into
a target-class and a non-target-class term with their own weights."""

from __future__ import annotations

from typing import Any

from ssl_lightning.losses import labelled_cross_entropy
from ssl_lightning.losses.dkd import decoupled_kd_terms
from ssl_lightning.methods.supervised.distillation import DistillationStudent


def dkd_warmup(epoch: int, warmup_epochs: float) -> float:
    """mdistiller's ``min(epoch / warmup, 1.0)`` with its 1-based epoch (Lightning counts from 0): the
    first epoch weighs the DKD term 1 / warmup_epochs, epoch ``warmup_epochs`` and later 1."""
    return 1.0 if warmup_epochs <= 0 else min((epoch + 1) / warmup_epochs, 1.0)


class DKD(DistillationStudent):
    """Decoupled knowledge distillation from a frozen classifier teacher:

        loss = ce_weight * CE(s, y) + w(epoch) * (alpha * TCKD + beta * NCKD)
        w(epoch) = min(epoch / dkd_warmup_epochs, 1)          (epoch counted from 1, as mdistiller does)

    TCKD is T^2 KL between the teacher's and the student's binary (target class, all others)
    distributions; NCKD is T^2 KL between their distributions over the non-target classes
    (``losses.dkd.decoupled_kd_terms``, which follows mdistiller's ``dkd_loss``). Logits are the
    student's and the teacher's on the same augmented view (the teacher online, under no_grad).
    Defaults are DKD's CIFAR-100 setting in mdistiller (megvii-research/mdistiller,
    ``mdistiller/engine/cfg.py`` ``CFG.DKD``, ``mdistiller/distillers/DKD.py``): CE weight 1, alpha 1,
    beta 8, T 4, a 20-epoch linear warm-up of the DKD weight. (The paper tunes beta per teacher-student
    pair; mdistiller's per-pair configs set it, e.g. 8 for ResNet32x4 -> ResNet8x4.)

    Unlabelled rows (label -1) have no target class: both the CE and the DKD terms mask them.

    Logged terms: ``loss/ce``, ``loss/tckd``, ``loss/nckd`` (unweighted). The teacher: see :class:`KD`'s
    arguments and :class:`~ssl_lightning.components.frozen_teacher.FrozenTeacher`.

    Args:
        alpha: weight of TCKD.
        beta: weight of NCKD.
        temperature: T of both terms.
        ce_weight: weight of the cross-entropy with the labels.
        dkd_warmup_epochs: epochs over which the DKD weight rises linearly to 1 (0: no warm-up); not the
            learning rate's ``warmup_epochs``.
        **kwargs: the teacher's arguments (``teacher_ckpt``, ``teacher_timm``, ...: see
            :class:`~ssl_lightning.methods.supervised.distillation.DistillationStudent`) and the backbone, data,
            optimizer and schedule arguments of :class:`SupervisedMethod`.
    """

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 8.0,
        temperature: float = 4.0,
        ce_weight: float = 1.0,
        dkd_warmup_epochs: float = 20.0,
        **kwargs: Any,
    ):
        if temperature <= 0:
            raise ValueError(f"DKD: temperature must be > 0, got {temperature}.")
        super().__init__(**kwargs)

    def shared_step(self, batch: dict) -> dict:
        hp = self.hparams
        images, labels = batch["views"][0], batch["label"]
        feats = self.backbone(images)
        logits = self.head(feats)
        ce = labelled_cross_entropy(logits, labels)
        tckd, nckd = decoupled_kd_terms(logits, self.teacher_logits(batch), labels, hp.temperature)
        epoch = self._trainer.current_epoch if self._trainer is not None else 0
        loss = hp.ce_weight * ce + dkd_warmup(epoch, hp.dkd_warmup_epochs) * (hp.alpha * tckd + hp.beta * nckd)
        return {"loss": loss, "loss/ce": ce, "loss/tckd": tckd, "loss/nckd": nckd, "feats": feats, "logits": logits}
