"""KD (Hinton, Vinyals and Dean 2015, "Distilling the Knowledge in a Neural Network"): a student
trained on the labels and on a frozen teacher's temperature-softened predictions."""

from __future__ import annotations

from typing import Any

from ssl_lightning.losses import labelled_cross_entropy
from ssl_lightning.losses.kd import kd_loss
from ssl_lightning.methods.supervised.distillation import DistillationStudent


class KD(DistillationStudent):
    """Knowledge distillation from a frozen classifier teacher:

        loss = ce_weight * CE(s, y) + kd_weight * T^2 KL(softmax(t / T) || softmax(s / T))

    with s, t the student's and the teacher's logits of the same augmented view (the teacher runs
    online, under no_grad), the KL summed over classes and averaged over the batch
    (``losses.kd.kd_loss``). Defaults are mdistiller's CIFAR-100 setting (megvii-research/mdistiller,
    ``mdistiller/engine/cfg.py`` ``CFG.KD``, ``mdistiller/distillers/KD.py``): T = 4, ce_weight 0.1,
    kd_weight 0.9. With kd_weight 0 and ce_weight 1 this is the ``Classifier`` baseline.

    Unlabelled rows (label -1): the cross-entropy masks them, the KD term keeps them (it needs no
    label), so unlabelled images still learn from the teacher.

    Logged terms: ``loss/ce`` and ``loss/kd`` (unweighted). The teacher (``teacher``, a
    :class:`~ssl_lightning.components.frozen_teacher.FrozenTeacher`) is loaded in ``setup("fit")`` from
    one source, and left out of checkpoints unless ``save_teacher``; see that class.

    Args:
        temperature: T, the softmax temperature of both distributions in the KD term.
        ce_weight: weight of the cross-entropy with the labels.
        kd_weight: weight of the KD term.
        **kwargs: the teacher's arguments (``teacher_ckpt``, ``teacher_timm``, ...: see
            :class:`~ssl_lightning.methods.supervised.distillation.DistillationStudent`) and the backbone, data,
            optimizer and schedule arguments of :class:`SupervisedMethod`.
    """

    def __init__(
        self,
        temperature: float = 4.0,
        ce_weight: float = 0.1,
        kd_weight: float = 0.9,
        **kwargs: Any,
    ):
        if temperature <= 0:
            raise ValueError(f"KD: temperature must be > 0, got {temperature}.")
        super().__init__(**kwargs)

    def shared_step(self, batch: dict) -> dict:
        images, labels = batch["views"][0], batch["label"]
        feats = self.backbone(images)
        logits = self.head(feats)
        ce = labelled_cross_entropy(logits, labels)
        kd = kd_loss(logits, self.teacher_logits(batch), self.hparams.temperature)
        loss = self.hparams.ce_weight * ce + self.hparams.kd_weight * kd
        return {"loss": loss, "loss/ce": ce, "loss/kd": kd, "feats": feats, "logits": logits}
