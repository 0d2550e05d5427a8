"""SLA (Lee, Hwang and Shin, ICML 2020, "Self-supervised Label Augmentation via Input Transformations"):
a classifier over joint (class x rotation) labels, with single, aggregated or self-distilled inference."""

from __future__ import annotations

from typing import Any, Literal

import torch

from ssl_lightning.components.heads import LinearClassifier
from ssl_lightning.components.rotation import (
    NUM_ROTATIONS,
    aggregated_logits,
    class_logits_at,
    rotate_batch,
    single_logits,
)
from ssl_lightning.core.data_link import require_views
from ssl_lightning.losses.sla import sla_joint_loss, sla_sd_terms
from ssl_lightning.methods.supervised.base import SupervisedMethod

INFERENCE_MODES = ("single", "aggregated", "distilled")


class SLA(SupervisedMethod):
    """Self-supervised label augmentation with rotations: every training image enters the step in its
    four rotations (0, 90, 180, 270 degrees, made on the device by ``components.rotation``), and
    ``joint_head`` (a ``LinearClassifier`` with 4 x num_classes outputs) learns the joint label
    (class y, rotation j) = ``4 y + j``. With ``self_distillation`` (SLA+SD) a single-label ``head`` on
    the un-rotated image learns from the labels and from the aggregated joint prediction:

        SLA:     loss = joint_weight * L_SLA
        SLA+SD:  loss = joint_weight * L_SLA + CE(u(x), y) + T^2 KL(softmax(a(x) / T) || softmax(u(x) / T))

    L_SLA is the joint cross-entropy over the 4 B rotated rows, u the single-label head, a(x) the
    aggregated joint logits (detached); T = 1 (``losses.sla``). The official code
    (hankook/SLA, ``trainers.py`` ``create_sla_trainer`` / ``create_sla_sd_trainer``) weighs every
    term 1; its ``--with-large-loss`` (ImageNet, iNaturalist) multiplies L_SLA by 4, here
    ``joint_weight: 4``.

    Inference (``forward``, and so validation, ``test``, ``predict`` and the monitors), by ``inference``:
      * "single" (SLA+SI): the joint head's class logits at rotation 0 of the un-rotated image, one pass;
      * "aggregated" (SLA+AG): the mean over the four rotated inputs of each one's class logits at its
        own rotation, four passes (the paper's most accurate mode);
      * "distilled" (SLA+SD): the single-label head, one pass; needs ``self_distillation``.
    The default is SLA+SD: what the official code selects its checkpoints by (``single_acc``), at the
    test cost of a plain classifier. Training top-1 / top-5 are those of the chosen mode.

    Unlabelled rows (-1) leave both cross-entropies; the distillation term keeps them (it needs no label).

    Logged terms: ``loss/joint`` and, with self-distillation, ``loss/single``, ``loss/distill`` (the
    latter including T^2), unweighted.

    The official CIFAR recipe is SGD (momentum 0.9) at LR 0.1 for batch 128, weight decay 1e-4,
    80,000 iterations with the LR divided by 10 at 1/2 and 3/4 (``train.py``); see
    ``configs/cifar100/sla.yaml``.

    Args:
        self_distillation: add the single-label head and its two terms (SLA+SD).
        inference: "single", "aggregated" or "distilled" (see above).
        temperature: T of the self-distillation (the paper's and the code's 1).
        joint_weight: weight of L_SLA (1; 4 is the official ``--with-large-loss``).
        **kwargs: backbone, data, optimizer and schedule arguments of :class:`SupervisedMethod`.
    """

    def __init__(
        self,
        self_distillation: bool = True,
        inference: Literal["single", "aggregated", "distilled"] = "distilled",
        temperature: float = 1.0,
        joint_weight: float = 1.0,
        **kwargs: Any,
    ):
        if inference not in INFERENCE_MODES:
            raise ValueError(f"SLA: inference must be one of {INFERENCE_MODES}, got {inference!r}.")
        if inference == "distilled" and not self_distillation:
            raise ValueError(
                "SLA: inference='distilled' reads the single-label head, which only self_distillation=True "
                "trains. Set self_distillation: true, or inference: aggregated (SLA+AG) or single (SLA+SI)."
            )
        if temperature <= 0:
            raise ValueError(f"SLA: temperature must be > 0, got {temperature}.")
        if joint_weight < 0:
            raise ValueError(f"SLA: joint_weight must be >= 0, got {joint_weight}.")
        super().__init__(**kwargs)
        self.joint_head: LinearClassifier | None = None

    def build_heads(self, feat_dim: int) -> None:
        # ``head`` is SLA+SD's single-label head; without self-distillation nothing would train it (and
        # DDP refuses unused parameters). The base's build_heads also refuses a missing num_classes.
        if self.hparams.self_distillation or not self.hparams.num_classes:
            super().build_heads(feat_dim)
        self.joint_head = LinearClassifier(feat_dim, NUM_ROTATIONS * self.hparams.num_classes)

    def shared_step(self, batch: dict) -> dict:
        hp = self.hparams
        images, labels = batch["views"][0], batch["label"]
        feats = self.backbone(rotate_batch(images))  # [4 B, D], image i's rotations in rows 4 i .. 4 i + 3
        joint = self.joint_head(feats)
        plain_feats = feats[0::NUM_ROTATIONS]  # rotation 0: the images as they came
        if hp.self_distillation:
            single = self.head(plain_feats)
            joint_loss, single_loss, distill = sla_sd_terms(joint, single, labels, hp.temperature)
            out = {"loss": hp.joint_weight * joint_loss + single_loss + distill, "loss/joint": joint_loss,
                   "loss/single": single_loss, "loss/distill": distill}
        else:
            single, joint_loss = None, sla_joint_loss(joint, labels)
            out = {"loss": hp.joint_weight * joint_loss, "loss/joint": joint_loss}
        return {**out, "feats": plain_feats, "logits": self._read(joint, single, rotated=True)}

    # ----------------------------------------------------------------- inference
    def _read(self, joint: torch.Tensor | None, single: torch.Tensor | None, rotated: bool) -> torch.Tensor:
        mode = self.hparams.inference
        if mode == "distilled":
            return single
        if mode == "aggregated":
            return aggregated_logits(joint)
        return single_logits(joint) if rotated else class_logits_at(joint, 0)

    def infer(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Backbone features of ``images`` and the class logits of the chosen inference mode."""
        if self.hparams.inference != "aggregated":
            feats = self.backbone(images)
            if self.hparams.inference == "distilled":
                return feats, self.head(feats)
            return feats, class_logits_at(self.joint_head(feats), 0)
        feats = self.backbone(rotate_batch(images))
        return feats[0::NUM_ROTATIONS], aggregated_logits(self.joint_head(feats))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.infer(images)[1]

    def embed(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        feats, logits = self.infer(images)
        return {"feats": feats, "embeds": logits}

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        require_views(batch, type(self).__name__)
        feats, logits = self.infer(batch["views"][0])
        return {"feats": feats, "logits": logits, "probs": logits.float().softmax(dim=1), "label": batch["label"],
                "index": batch["index"]}
