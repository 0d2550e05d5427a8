"""Classifier: the supervised baseline (cross-entropy, label smoothing, Mixup / CutMix by timm)."""

from __future__ import annotations

from typing import Literal

import torch
from timm.data import Mixup

from ssl_lightning.losses import labelled_cross_entropy, soft_cross_entropy
from ssl_lightning.methods.supervised.base import SupervisedMethod


class Classifier(SupervisedMethod):
    """A backbone and a linear head trained with cross-entropy on the labelled images: the supervised
    baseline, and later the teacher of distillation and the source model of test-time adaptation.

    Defaults are the standard CIFAR recipe (SGD, LR 0.1 per 256 images, momentum 0.9, weight decay
    5e-4, cosine, no warm-up; ``configs/cifar10/classifier.yaml`` adds Nesterov), with no label
    smoothing and no mixing. Label smoothing spreads ``label_smoothing`` of each target over all
    classes (``torch.nn.functional.cross_entropy``'s rule, which timm's Mixup targets share).

    Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019) are timm's ``Mixup``: each image is mixed
    with its partner in the reversed batch and the target becomes the mix of both (smoothed) labels,
    trained with soft-target cross-entropy. Either alpha above 0 turns it on (both: one of the two
    per batch, CutMix with probability ``mixup_switch_prob``). A mixed image belongs to two classes,
    so ``train/top1`` and ``train/top5`` are not logged then (as in timm's training script); a row
    whose image or partner is unlabelled (-1) leaves the loss. The batch must be even.

    Args:
        label_smoothing: target smoothing (0 = hard labels; timm's ImageNet recipes use 0.1).
        mixup_alpha: Beta(alpha, alpha) of Mixup's mixing weight; 0 turns Mixup off (timm: 0.8).
        cutmix_alpha: Beta(alpha, alpha) of CutMix's box area; 0 turns CutMix off (timm: 1.0).
        mixup_prob: probability of mixing a batch at all.
        mixup_switch_prob: probability of CutMix instead of Mixup when both are on.
        mixup_mode: "batch" (one draw per batch), "pair" or "elem" (per pair / per image).
        **kwargs: backbone, data, optimizer and schedule arguments of :class:`SupervisedMethod`.
    """

    def __init__(
        self,
        label_smoothing: float = 0.0,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5,
        mixup_mode: Literal["batch", "pair", "elem"] = "batch",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"Classifier: label_smoothing must be in [0, 1), got {label_smoothing}.")
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError(f"Classifier: mixup_alpha and cutmix_alpha must be >= 0, got {mixup_alpha}, {cutmix_alpha}.")
        self.mixup: Mixup | None = None

    def build_heads(self, feat_dim: int) -> None:
        super().build_heads(feat_dim)
        hp = self.hparams
        if hp.mixup_alpha > 0 or hp.cutmix_alpha > 0:
            self.mixup = Mixup(
                mixup_alpha=hp.mixup_alpha, cutmix_alpha=hp.cutmix_alpha, prob=hp.mixup_prob,
                switch_prob=hp.mixup_switch_prob, mode=hp.mixup_mode, label_smoothing=hp.label_smoothing,
                num_classes=hp.num_classes,
            )

    def shared_step(self, batch: dict) -> dict:
        images, labels = batch["views"][0], batch["label"]
        if self.mixup is None:
            feats = self.backbone(images)
            logits = self.head(feats)
            loss = labelled_cross_entropy(logits, labels, self.hparams.label_smoothing)
            return {"loss": loss, "feats": feats, "logits": logits}
        images, targets, weights = self._mix(images, labels)
        feats = self.backbone(images)
        return {"loss": soft_cross_entropy(self.head(feats), targets, weights), "feats": feats}

    def _mix(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if images.shape[0] % 2:
            raise ValueError(
                f"Classifier: Mixup/CutMix pairs each image with another one (timm's Mixup reverses the batch), so it "
                f"needs an even batch; got {images.shape[0]} images. Use an even batch_size, and drop_last: true."
            )
        labelled = labels >= 0
        # timm's targets need a class for every row; an unlabelled row's stand-in 0 is weighed out below.
        mixed, targets = self.mixup(images, labels.clamp(min=0))
        # Each mixed image takes part of its target from its partner, the same row of the reversed batch.
        return mixed, targets, (labelled & labelled.flip(0)).to(targets.dtype)
