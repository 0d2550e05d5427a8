"""Random Teachers (Sarnthein, Bachmann, Anagnostidis, Hofmann, "Random Teachers are Good Teachers", ICML 2023):
DINO's self-distillation with the teacher frozen at its random initialisation."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import nn

from ssl_lightning.components.heads import DINOHead
from ssl_lightning.components.teacher import EMATeacher
from ssl_lightning.losses.dino import dino_teacher_targets
from ssl_lightning.losses.soft_cross_entropy import soft_cross_entropy
from ssl_lightning.methods.ssl.base import SSLMethod

STUDENT_INITS = ("close", "independent")


class RandomTeachers(SSLMethod):
    """A student distilled from a teacher that never trains, with the paper's CIFAR-10 setting (the official
    safelix/dinopl ``configs/cifar10_distillation_v2.json`` over the defaults of its ``configuration.py``):
    one un-augmented view, seen by student and teacher alike and paired with itself (``loss_pairing: same``);
    DINO's head (2048-2048 GELU MLP, an L2-normalised 256-d bottleneck, a weight-normalised bias-free
    last layer to 65,536 outputs, all weights from a truncated normal with std 0.02 as dinopl's
    ``head_init_method: trunc_normal``); teacher and student temperature 1; no centring; AdamW with LR
    1e-3 per 256 images, no weight decay, no warm-up, a constant LR, no gradient clipping, the last layer
    never frozen. The loss is the cross-entropy of the student's prediction against the teacher's target
    on the same image (:func:`~ssl_lightning.losses.dino.dino_teacher_targets` with ``centering="none"``,
    then :func:`~ssl_lightning.losses.soft_cross_entropy.soft_cross_entropy` over the global batch):

        L = 1/B sum_n - sum_k softmax(t_n / T_t)_k log softmax(s_n / T_s)_k

    The teacher (backbone and head) is an :class:`EMATeacher` with ``frozen=True``: a copy of the network
    as first drawn, never updated, outside the optimizer, saved in checkpoints. With ``teacher_eval`` (dinopl's
    ``t_eval: true`` with ``t_bn_mode: from_data``) it runs in eval mode, so its BatchNorm layers normalise
    with their initial running statistics (mean 0, variance 1) for the whole run, while the student
    normalises with batch statistics; False uses batch statistics in the teacher too (``EMATeacher``'s
    forward). Either way the teacher's weights and buffers stay bit-identical.

    ``student_init`` (dinopl's ``init_student_teacher``): "close" starts the student at or near the teacher,
    ``theta_S = ((1 - a) theta_T + a theta~) / sqrt((1 - a)^2 + a^2)`` for every trainable tensor, with
    ``theta~`` a fresh random draw of the same network and ``a = student_init_alpha`` (dinopl's
    ``s_init: interpolated`` with ``s_init_var_preserving``, the paper's locality experiments; its
    variance-preserving ``neighborhood`` option with scale eps is ``a = eps / (1 + eps)``). The default
    ``a = 0`` is dinopl's default ``s_init: teacher``: the student starts as an exact copy, and learns
    only because the teacher's eval-mode BatchNorm differs from the student's (the paper: learning is
    strongly amplified when the student starts close to the teacher). A backbone without BatchNorm (a
    ViT), or ``teacher_eval=False``, has no such difference: at ``a = 0`` its gradients are rounding
    noise (which Adam's normalised steps still follow), so give it a small ``a`` (e.g. 0.01).
    "independent" draws the student afresh (``a = 1``; dinopl's ``s_init: random``). In a seeded run
    every rank draws the same networks.

    At the end of ``fit``, :class:`~ssl_lightning.callbacks.KNNReport` lists the frozen teacher's kNN
    accuracy beside the trained student's (:meth:`knn_report_encoders`); the paper's finding is that the
    student beats its teacher.

    Departures: the recipe's timm ResNet-18 needs ``zero_init_last: false`` to start like dinopl's
    torchvision-style ResNet (timm zeroes each block's last BatchNorm, which would leave a frozen teacher's
    residual branches dead); our CIFAR stem's 3x3 convolution keeps PyTorch's default initialisation.
    kNN is our cosine-weighted protocol (k 200, T 0.1), not dinopl's Euclidean majority vote (k 20).

    Args:
        out_dim, proj_hidden_dim, bottleneck_dim: the head's output, hidden and bottleneck widths.
        student_temp, teacher_temp: the softmax temperatures T_s and T_t.
        student_init: "close" or "independent".
        student_init_alpha: a in [0, 1], the fresh draw's share of a "close" student (0: the teacher itself).
        teacher_eval: run the teacher in eval mode (its initial BatchNorm statistics) rather than on batch statistics.
        optimizer, lr, weight_decay, schedule, warmup_epochs: the paper's optimisation (see :class:`TrainModule`).
        **kwargs: backbone, optimizer and schedule arguments of :class:`SSLMethod`.
    """

    expected_views = 1  # student and teacher see the same single view

    def __init__(
        self,
        out_dim: int = 65536,
        proj_hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        student_temp: float = 1.0,
        teacher_temp: float = 1.0,
        student_init: Literal["close", "independent"] = "close",
        student_init_alpha: float = 0.0,
        teacher_eval: bool = True,
        optimizer: Literal["lars", "sgd", "adamw", "lamb", "adamp", "adam"] = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        schedule: Literal["warmup_cosine", "infinite", "constant"] = "constant",
        warmup_epochs: float = 0.0,
        **kwargs: Any,
    ):
        name = type(self).__name__
        if student_init not in STUDENT_INITS:
            raise ValueError(f"{name}: unknown student_init {student_init!r}; valid values are {', '.join(STUDENT_INITS)}.")
        if not 0.0 <= student_init_alpha <= 1.0:
            raise ValueError(f"{name}: student_init_alpha must be in [0, 1] (0: the teacher itself), got {student_init_alpha}.")
        if student_init == "independent" and student_init_alpha:
            raise ValueError(f"{name}: student_init_alpha applies to student_init='close' only; an independent student "
                             "is a whole fresh draw (alpha 1). Leave it at 0 or use student_init='close'.")
        if student_temp <= 0 or teacher_temp <= 0:
            raise ValueError(f"{name} needs temperatures > 0; got student_temp={student_temp}, teacher_temp={teacher_temp}.")
        super().__init__(optimizer=optimizer, lr=lr, weight_decay=weight_decay, schedule=schedule,
                         warmup_epochs=warmup_epochs, **kwargs)

    def build_head(self, feat_dim: int) -> DINOHead:
        hp = self.hparams
        head = DINOHead(feat_dim, hp.out_dim, hp.proj_hidden_dim, hp.bottleneck_dim)
        nn.init.trunc_normal_(head.last_layer.weight, std=0.02)  # dinopl initialises the last layer as the MLP
        return head

    def build_heads(self, feat_dim: int) -> None:
        self.projector = self.build_head(feat_dim)
        # The teacher keeps the network as first drawn; the student then moves off it (or not).
        self.teacher = EMATeacher(self._online_network(), frozen=True)
        hp = self.hparams
        alpha = 1.0 if hp.student_init == "independent" else hp.student_init_alpha
        if alpha > 0:
            interpolate_parameters(self._online_network(), self.fresh_online_network(feat_dim), alpha)

    def fresh_online_network(self, feat_dim: int) -> nn.Module:
        """A new random draw of the backbone and head: the student's share of its initialisation."""
        return nn.Sequential(self.build_fresh_backbone(), self.build_head(feat_dim))

    def _online_network(self) -> nn.Module:
        # what the teacher is a copy of: the backbone and the whole head
        return nn.Sequential(self.backbone, self.projector)

    def knn_report_encoders(self) -> dict[str, nn.Module]:
        """What :class:`~ssl_lightning.callbacks.KNNReport` evaluates beside the trained backbone."""
        return {"frozen teacher": self.teacher.module[0]}

    def embed(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.backbone(images)
        return {"feats": feats, "embeds": self.projector(feats, pre_logits=True)}

    @torch.no_grad()
    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen teacher's ``[N, out_dim]`` logits, in eval mode with ``teacher_eval``."""
        if not self.hparams.teacher_eval:
            return self.teacher(images)  # batch statistics, running statistics untouched
        network = self.teacher.module
        was_training = network.training
        network.eval()  # Lightning puts every module in train mode each epoch: switch for this call only
        try:
            return network(images)
        finally:
            network.train(was_training)

    def shared_step(self, batch: dict) -> dict:
        hp = self.hparams
        images = batch["views"][0]
        feats = self.backbone(images)
        student_logits = self.projector(feats)
        targets = dino_teacher_targets(self.teacher_logits(images).unsqueeze(0), hp.teacher_temp, "none")[0]
        # float32 before the division: a bf16 logit divided by T_s would lose the small differences
        loss = soft_cross_entropy(student_logits.float() / hp.student_temp, targets)
        return {"loss": loss, "feats": feats}


@torch.no_grad()
def interpolate_parameters(student: nn.Module, fresh: nn.Module, alpha: float) -> None:
    """``p_S <- ((1 - alpha) p_S + alpha p_fresh) / sqrt((1 - alpha)^2 + alpha^2)`` for every trainable
    parameter, in place (dinopl's ``interpolated`` initialisation with the variance-preserving correction,
    which keeps the spread of two independent draws' mix at that of one). Buffers (BatchNorm statistics,
    the head's fixed weight-norm gain) and frozen parameters keep the student's values; alpha = 1 gives
    the fresh draw exactly."""
    scale = 1.0 / math.sqrt((1.0 - alpha) ** 2 + alpha**2)
    for own, drawn in zip(student.parameters(), fresh.parameters(), strict=True):
        if own.requires_grad:
            own.mul_((1.0 - alpha) * scale).add_(drawn.to(own.device, own.dtype), alpha=alpha * scale)
