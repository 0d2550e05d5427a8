"""DINO (Caron et al., ICCV 2021): self-distillation with no labels; a student matches an EMA teacher's
centred, sharpened output distribution across multi-crop views."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from ssl_lightning.components.heads import DINOHead
from ssl_lightning.components.multicrop import (
    check_backbone_takes_every_size,
    check_global_crops,
    forward_per_resolution,
    global_views,
)
from ssl_lightning.components.teacher import EMATeacher
from ssl_lightning.core.optimization import clip_gradients_per_parameter
from ssl_lightning.core.step_logging import logger_writes_this_step
from ssl_lightning.losses.dino import CENTERINGS, dino_centre_update, dino_loss, dino_teacher_targets
from ssl_lightning.methods.ssl.base import SSLMethod

#: crops the teacher sees: the two global crops, which come first in the view recipe
NUM_GLOBAL_CROPS = 2
#: local crops a recipe may add (the official default is 8; 10 leaves room for larger recipes)
MAX_LOCAL_CROPS = 10


def teacher_temperature(epoch: int, warmup_temp: float, final_temp: float, warmup_epochs: int) -> float:
    """DINO's teacher temperature for ``epoch`` (the official ``teacher_temp_schedule``): linear from
    ``warmup_temp`` at epoch 0 to ``final_temp`` at epoch ``warmup_epochs - 1`` (``np.linspace`` over
    ``warmup_epochs`` points; one point is ``warmup_temp``), then ``final_temp``."""
    if epoch >= warmup_epochs:
        return final_temp
    if warmup_epochs == 1:
        return warmup_temp
    return warmup_temp + (final_temp - warmup_temp) * epoch / (warmup_epochs - 1)


class DINO(SSLMethod):
    """DINO with the paper's defaults (facebookresearch/dino ``main_dino.py``, ViT-S/16 recipe): a
    :class:`~ssl_lightning.components.heads.DINOHead` (3 layers, 2048 hidden, bottleneck 256, 65,536
    outputs, weight-normalised last layer with its gain frozen at 1), student temperature 0.1, teacher
    temperature 0.04 rising linearly to 0.07 over the first 30 epochs, a running centre with momentum
    0.9, teacher EMA momentum 0.996 rising to 1 on a cosine, AdamW with LR 5e-4 per 256 images, 10
    warm-up epochs and a cosine to 1e-6 (``min_lr_ratio`` 0.002 of the peak at batch 256), weight
    decay 0.04 rising to 0.4 on a cosine (``weight_decay_end``; biases and norms undecayed), each
    parameter's gradient clipped to norm 3.0, and the last layer's gradients dropped during the
    first epoch.

    Multi-crop (:mod:`~ssl_lightning.components.multicrop`): the student sees every crop, the backbone
    running once per crop resolution; the teacher (backbone and head, one EMA copy) sees the two
    global crops, the first two views; the loss (:func:`~ssl_lightning.losses.dino.dino_loss`) sums
    every (teacher crop i, student crop j) pair with i != j. ``data.views: dino`` gives 2 global and
    6 local crops; a two-view recipe (``simclr``, ``byol``) trains on the global crops alone. A recipe
    that does not start with two crops of one size is refused before training. A timm ViT takes
    local crops with ``backbone_kwargs: {dynamic_img_size: true}``; ResNets take any size.

    ``centering`` picks the teacher's targets (:func:`~ssl_lightning.losses.dino.dino_teacher_targets`):
    "centre" (DINO: the running centre, a persistent buffer, updated each step from the global batch's
    teacher outputs after the loss), "sinkhorn_knopp" (DINOv2) or "none".

    Gradient clipping is DINO's per-parameter clipping, done here (``clip_grad``) rather than by
    Lightning's ``trainer.gradient_clip_val``, which clips the norm of all gradients together and so
    would be another method; leave the Trainer's unset. ``embed`` returns the backbone's features
    and the head's L2-normalised bottleneck (not the 65,536 logits).

    Logged on logger steps: ``momentum`` (the teacher's), ``teacher_temp`` and ``wd/weights``.

    Departures: the teacher's BatchNorm running statistics follow the student's by EMA
    (:class:`EMATeacher`; the official teacher keeps its own); the teacher is a copy of the student,
    so a ``drop_path_rate`` in ``backbone_kwargs`` would drop paths in the teacher too (DINO's
    student has 0.1, its teacher none: leave it unset); biases, norms and a ViT's position embedding
    and class token are undecayed (the official code decays every parameter of two or more
    dimensions).

    Args:
        out_dim: the head's output dimension K.
        proj_hidden_dim, bottleneck_dim: the head's hidden and bottleneck widths.
        use_bn_in_head: BatchNorm after the head's hidden layers (off in DINO).
        norm_last_layer: freeze the last layer's weight-norm gain at 1 (the official default; its
            README turns it off for ViT-S).
        student_temp: the student's softmax temperature.
        teacher_temp, warmup_teacher_temp, warmup_teacher_temp_epochs: the teacher's temperature
            after and at the start of its linear warm-up, and the warm-up's length in epochs.
        centering: "centre", "sinkhorn_knopp" or "none".
        centre_momentum: the running centre's momentum.
        sinkhorn_iterations: Sinkhorn-Knopp rounds with ``centering="sinkhorn_knopp"``.
        base_momentum, final_momentum: the teacher's EMA momentum at the first and last step.
        clip_grad: the largest norm of each parameter's gradient (0: no clipping).
        freeze_last_layer: epochs during which the head's last layer gets no update.
        optimizer, lr, weight_decay, weight_decay_end, warmup_epochs, min_lr_ratio: DINO's
            optimisation (see :class:`TrainModule`).
        **kwargs: backbone, optimizer and schedule arguments of :class:`SSLMethod`.
    """

    expected_views = (NUM_GLOBAL_CROPS, NUM_GLOBAL_CROPS + MAX_LOCAL_CROPS)

    def __init__(
        self,
        out_dim: int = 65536,
        proj_hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        use_bn_in_head: bool = False,
        norm_last_layer: bool = True,
        student_temp: float = 0.1,
        teacher_temp: float = 0.07,
        warmup_teacher_temp: float = 0.04,
        warmup_teacher_temp_epochs: int = 30,
        centering: Literal["centre", "sinkhorn_knopp", "none"] = "centre",
        centre_momentum: float = 0.9,
        sinkhorn_iterations: int = 3,
        base_momentum: float = 0.996,
        final_momentum: float = 1.0,
        clip_grad: float = 3.0,
        freeze_last_layer: int = 1,
        optimizer: Literal["lars", "sgd", "adamw", "lamb", "adamp", "adam"] = "adamw",
        lr: float = 5e-4,
        weight_decay: float = 0.04,
        weight_decay_end: float | None = 0.4,
        warmup_epochs: float = 10.0,
        min_lr_ratio: float = 0.002,
        **kwargs: Any,
    ):
        if centering not in CENTERINGS:
            raise ValueError(f"{type(self).__name__}: unknown centering {centering!r}; valid values are "
                             f"{', '.join(CENTERINGS)}.")
        if clip_grad < 0 or freeze_last_layer < 0 or warmup_teacher_temp_epochs < 0:
            raise ValueError(
                f"{type(self).__name__} needs clip_grad >= 0 (0: no clipping), freeze_last_layer >= 0 and "
                f"warmup_teacher_temp_epochs >= 0; got {clip_grad}, {freeze_last_layer} and {warmup_teacher_temp_epochs}"
            )
        super().__init__(optimizer=optimizer, lr=lr, weight_decay=weight_decay, weight_decay_end=weight_decay_end,
                         warmup_epochs=warmup_epochs, min_lr_ratio=min_lr_ratio, **kwargs)

    def build_heads(self, feat_dim: int) -> None:
        hp = self.hparams
        self.projector = DINOHead(feat_dim, hp.out_dim, hp.proj_hidden_dim, hp.bottleneck_dim,
                                  use_bn=hp.use_bn_in_head, norm_last_layer=hp.norm_last_layer)
        self.teacher = EMATeacher(self._online_network(), hp.base_momentum, hp.final_momentum)
        if hp.centering == "centre":
            # a buffer: checkpointed, so a resumed run continues with the same centre
            self.register_buffer("centre", torch.zeros(1, hp.out_dim))

    def _online_network(self) -> nn.Module:
        # what the teacher mirrors: the backbone and the whole head
        return nn.Sequential(self.backbone, self.projector)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        datamodule = getattr(self.trainer, "datamodule", None)
        specs = getattr(datamodule, "view_specs", None)
        if specs is not None:  # a DataModule's recipe is checked before training; bare loaders' batches each step
            sizes = [spec.crop_size for spec in specs for _ in range(spec.num)]
            check_global_crops(sizes, NUM_GLOBAL_CROPS, type(self).__name__, datamodule.views)
            check_backbone_takes_every_size(self.backbone, sizes, type(self).__name__)

    def teacher_temp_now(self) -> float:
        hp = self.hparams
        return teacher_temperature(self.current_epoch, hp.warmup_teacher_temp, hp.teacher_temp,
                                   hp.warmup_teacher_temp_epochs)

    def embed(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.backbone(images)
        return {"feats": feats, "embeds": self.projector(feats, pre_logits=True)}

    def shared_step(self, batch: dict) -> dict:
        hp = self.hparams
        views = batch["views"]
        teacher_views = global_views(views, NUM_GLOBAL_CROPS, type(self).__name__)
        num_images = views[0].shape[0]
        feats = forward_per_resolution(self.backbone, views)  # [V * N, D]: one pass per crop size
        student_logits = self.projector(feats).view(len(views), num_images, -1)
        teacher_logits = self.teacher(torch.cat(teacher_views)).view(NUM_GLOBAL_CROPS, num_images, -1)
        centre = self.centre if hp.centering == "centre" else None
        targets = dino_teacher_targets(teacher_logits, self.teacher_temp_now(), hp.centering, centre,
                                       hp.sinkhorn_iterations)
        loss = dino_loss(student_logits, targets, hp.student_temp)
        if centre is not None:  # after the targets: this batch is centred by the earlier ones
            self.centre.copy_(dino_centre_update(self.centre, teacher_logits, hp.centre_momentum))
        return {"loss": loss, "feats": feats[:num_images]}

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        super().on_before_optimizer_step(optimizer)
        hp = self.hparams
        if self.current_epoch < hp.freeze_last_layer:
            # The official cancel_gradients_last_layer: no gradient, so the optimizer leaves the last
            # layer (its weight decay and moments too) while the targets are still near uniform.
            for parameter in self.projector.last_layer.parameters():
                parameter.grad = None
        if hp.clip_grad:
            clip_gradients_per_parameter(self._online_network().parameters(), hp.clip_grad, self.trainer)

    def on_optimizer_step(self, step: int) -> None:
        momentum = self.teacher.momentum(step, int(self.trainer.estimated_stepping_batches))
        self.teacher.update(self._online_network(), momentum)
        if logger_writes_this_step(self.trainer):
            self.log("momentum", momentum, batch_size=1)
            self.log("teacher_temp", self.teacher_temp_now(), batch_size=1)
