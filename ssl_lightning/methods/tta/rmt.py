"""RMT (Döbler, Marsden, Yang, "Robust Mean Teacher for Continual and Gradual Test-Time Adaptation",
CVPR 2023)."""

from __future__ import annotations

from collections.abc import Iterator
from itertools import count
from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from ssl_lightning.components.teacher import EMATeacher
from ssl_lightning.losses.tta_consistency import prototype_contrastive_loss, symmetric_cross_entropy
from ssl_lightning.methods.tta.augment import pixel_augment
from ssl_lightning.methods.tta.base import TTAMethod
from ssl_lightning.methods.tta.params import adapt_only, use_test_batch_statistics

#: source images averaged into the class prototypes (the benchmark stops after 100,000 features)
PROTOTYPE_SAMPLES = 100_000


class RMTProjector(nn.Sequential):
    """The projector of RMT's contrastive loss: Linear -> ReLU -> Linear (the benchmark's, in
    ``classification/methods/rmt.py``). It lives here, not in ``components/heads.py``: test-time
    adaptation never runs under FSDP, whose units are the head classes."""

    def __init__(self, in_dim: int, dim: int = 128):
        super().__init__(nn.Linear(in_dim, dim), nn.ReLU(), nn.Linear(dim, dim))


class RMT(TTAMethod):
    """Robust mean teacher (mariodoebler/test-time-adaptation ``classification/methods/rmt.py``,
    ``cfgs/cifar10_c/rmt.yaml``, defaults from ``conf.py``). The student is every parameter of the
    source model (BatchNorm on test-batch statistics) and a projector; the teacher follows it by EMA
    with a fixed momentum. For each batch the loss is

        lambda_self_training * mean_i [SCE(s_i, t_i) + SCE(s~_i, t_i)] / 2
        + lambda_contrastive * contrastive(prototype nearest to f_i, f_i, f~_i)
        + lambda_source_ce * CE(student on a source batch, its labels)          (source_replay)

    where ``s``/``f`` are the student's logits/features of the test images, ``s~``/``f~`` those of one
    CoTTA augmentation of them (``augment.py``), ``t`` the teacher's logits, SCE the symmetric
    cross-entropy with weights 0.5 and 0.5, and the contrastive loss (``prototype_contrastive_loss``,
    temperature 0.1, through the projector) pulls each test feature and its augmentation towards the
    nearest (cosine) class prototype: the mean source feature of each class, over up to 100,000 source
    training images (``source_batches``). One optimizer step, then the EMA update. The prediction is
    the student's plus the teacher's logits, both from before the step.

    Before the first batch (once, before the source state is recorded, so a reset keeps it) the
    prototypes are computed and the mean teacher warms up: ``warmup_steps`` steps of the SCE between
    student and teacher on source images, the LR rising linearly to ``lr``, the teacher following by
    EMA. The optimizer goes on into adaptation with its Adam moments, as the benchmark's (which
    restores to this post-warm-up state too). The source batches hold as many images as the stream's
    batches (the benchmark's ``TEST.BATCH_SIZE``) unless ``source_batch_size`` says otherwise;
    replay cycles through the source training split in seeded orders and starts over at a reset.
    Every process replays the same source batches.

    ``source_free`` uses no source data at all: no warm-up, no replay, and no contrastive term, since
    its prototypes are mean source features (the benchmark has no strictly source-free mode: its
    "source-free" variant, ``RMT.LAMBDA_CE_SRC = 0``, still computes prototypes and warms up on source
    images). What remains is the SCE mean teacher with the augmented view.

    Args:
        teacher_momentum: EMA momentum of the teacher (``M_TEACHER.MOMENTUM``).
        temperature: of the contrastive loss (``CONTRAST.TEMPERATURE``).
        projection_dim: the projector's hidden and output width (``CONTRAST.PROJECTION_DIM``).
        lambda_self_training, lambda_contrastive, lambda_source_ce: the weights of the three terms
            (``RMT.LAMBDA_CE_TRG``, ``RMT.LAMBDA_CONT``, ``RMT.LAMBDA_CE_SRC``).
        warmup_steps: mean-teacher warm-up steps on source images; the benchmark's 50,000 warm-up images
            in batches of 200 (``RMT.NUM_SAMPLES_WARM_UP // TEST.BATCH_SIZE``); 0: none.
        source_replay: the source cross-entropy term each step.
        source_free: no source data (above); overrides ``warmup_steps`` and ``source_replay``.
        source_batch_size: images per source batch; None: the stream's batch size.
        **kwargs: the source model, optimizer and data arguments of :class:`TTAMethod`.
    """

    def __init__(
        self,
        teacher_momentum: float = 0.999,
        temperature: float = 0.1,
        projection_dim: int = 128,
        lambda_self_training: float = 1.0,
        lambda_contrastive: float = 1.0,
        lambda_source_ce: float = 1.0,
        warmup_steps: int = 250,
        source_replay: bool = True,
        source_free: bool = False,
        source_batch_size: int | None = None,
        optimizer: Literal["adam", "sgd"] = "adam",
        lr: float = 1e-3,
        beta: float = 0.9,
        weight_decay: float = 0.0,
        **kwargs,
    ):
        name = type(self).__name__
        if not 0.0 <= teacher_momentum <= 1.0:
            raise ValueError(f"{name}: teacher_momentum must lie in [0, 1], got {teacher_momentum}")
        if temperature <= 0 or projection_dim < 1:
            raise ValueError(f"{name}: temperature and projection_dim must be positive, got {temperature} and "
                             f"{projection_dim}")
        if min(lambda_self_training, lambda_contrastive, lambda_source_ce) < 0 or warmup_steps < 0:
            raise ValueError(f"{name}: the lambdas and warmup_steps must be >= 0, got {lambda_self_training}, "
                             f"{lambda_contrastive}, {lambda_source_ce} and {warmup_steps}")
        if source_batch_size is not None and source_batch_size < 1:
            raise ValueError(f"{name}: source_batch_size must be >= 1 or None (the stream's), got {source_batch_size}")
        super().__init__(optimizer=optimizer, lr=lr, beta=beta, weight_decay=weight_decay, **kwargs)
        self.projector: RMTProjector | None = None
        self._replay: Iterator[dict] | None = None

    @property
    def uses_source_data(self) -> bool:
        return not self.hparams.source_free

    def configure_adaptation(self) -> list[nn.Parameter]:
        hp = self.hparams
        use_test_batch_statistics(self.model)
        adapted = adapt_only(self.model, list(self.model.named_parameters()))  # the benchmark adapts everything
        self.teacher = EMATeacher(self.model, base_momentum=hp.teacher_momentum, final_momentum=hp.teacher_momentum)
        self.augment = pixel_augment(self)
        _, classifier = self.features_and_classifier()
        weight = getattr(classifier, "weight", None)
        if not isinstance(weight, Tensor) or weight.dim() != 2:
            raise ValueError(f"{type(self).__name__} needs a linear classifier on the features (a 2-D `weight`, "
                             f"[classes, features]); the source model's is {type(classifier).__name__}")
        if hp.source_free:
            rank_zero_info(f"{type(self).__name__}: source_free, so no warm-up, no source replay and no contrastive "
                           "term (its prototypes are source features).")
        elif hp.lambda_contrastive > 0:
            self.register_buffer("prototypes", weight.detach().new_zeros(weight.shape))
            self.projector = RMTProjector(weight.shape[1], hp.projection_dim)
            adapted += list(self.projector.parameters())
        return adapted

    # ----------------------------------------------------------------- source data, before the stream
    def on_test_start(self) -> None:
        if self._source_state is None and self.uses_source_data and not torch.is_inference_mode_enabled():
            if self.projector is not None:
                self.prototypes.copy_(self.source_prototypes())
            if self.hparams.warmup_steps > 0:
                self.tta_optimizer = super().build_optimizer(self.adapted)
                with torch.enable_grad():
                    self.warm_up()
        super().on_test_start()  # records the source state: after the warm-up

    def build_optimizer(self, parameters: list[nn.Parameter]) -> torch.optim.Optimizer:
        # the warm-up's optimizer goes on into adaptation with its moments, as the benchmark's
        return self.tta_optimizer if self.tta_optimizer is not None else super().build_optimizer(parameters)

    @torch.no_grad()
    def source_prototypes(self) -> Tensor:
        """The mean source feature of each class ``[C, D]``, over up to ``PROTOTYPE_SAMPLES`` training images."""
        features_of, _ = self.features_and_classifier()
        sums = torch.zeros_like(self.prototypes, dtype=torch.float64)
        counts = torch.zeros(len(sums), dtype=torch.float64, device=sums.device)
        for batch in self.source_batches(PROTOTYPE_SAMPLES, self._source_batch_size(), seed=0):
            labels = batch["label"]
            one_hot = F.one_hot(labels.clamp(min=0), len(sums)).double() * (labels >= 0)[:, None]
            sums += one_hot.T @ features_of(batch["views"][0]).flatten(1).double()
            counts += one_hot.sum(dim=0)
        missing = [c for c, n in enumerate(counts.tolist()) if n == 0]
        if missing:
            raise ValueError(f"{type(self).__name__}: no labelled source training image of class(es) {missing} among "
                             f"{int(counts.sum())}, so they have no prototype: use a source split with every class, "
                             "lambda_contrastive: 0, or source_free: true")
        return (sums / counts[:, None]).to(self.prototypes.dtype)

    def warm_up(self) -> None:
        """The benchmark's mean-teacher warm-up on source images (no labels), LR rising linearly."""
        hp, optimizer = self.hparams, self.tta_optimizer
        batches = self._source_stream(first_seed=1)
        for step in range(hp.warmup_steps):
            for group in optimizer.param_groups:
                group["lr"] = hp.lr * (step + 1) / hp.warmup_steps
            images = next(batches)["views"][0]
            loss = symmetric_cross_entropy(self.model(images), self.teacher(images)).mean()
            loss.backward()
            self.average_gradients(len(images))
            for parameter in self.projector.parameters() if self.projector is not None else ():
                parameter.grad = None  # as in the benchmark, Adam leaves the unused projector untouched
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            self.teacher.update(self.model, hp.teacher_momentum)
        for group in optimizer.param_groups:
            group["lr"] = hp.lr

    # ----------------------------------------------------------------- the stream
    def forward_and_adapt(self, images: Tensor) -> Tensor:
        hp = self.hparams
        features_of, classifier = self.features_and_classifier()
        features = features_of(images).flatten(1)
        logits = classifier(features)
        augmented = features_of(self.augment(images)).flatten(1)
        teacher_logits = self.teacher(images)
        consistency = symmetric_cross_entropy(logits, teacher_logits) + symmetric_cross_entropy(
            classifier(augmented), teacher_logits)
        loss = hp.lambda_self_training * consistency.mean() / 2
        if self.projector is not None:
            with torch.no_grad():  # the nearest prototype by cosine similarity
                nearest = (F.normalize(features, dim=1) @ F.normalize(self.prototypes, dim=1).T).argmax(dim=1)
            projected = self.projector(torch.cat([self.prototypes[nearest], features, augmented]))
            loss = loss + hp.lambda_contrastive * prototype_contrastive_loss(*projected.split(len(images)),
                                                                             temperature=hp.temperature)
        if hp.source_replay and self.uses_source_data:
            if self._replay is None:
                self._replay = self._source_stream(first_seed=2)
            batch = next(self._replay)
            labels = batch["label"]
            source_logits = classifier(features_of(batch["views"][0]).flatten(1)).float()
            cross_entropy = F.cross_entropy(source_logits, labels, ignore_index=-1, reduction="sum")
            loss = loss + hp.lambda_source_ce * cross_entropy / (labels >= 0).sum().clamp(min=1)
        self.adapt_step(loss, len(images))
        self.teacher.update(self.model, hp.teacher_momentum)
        return logits + teacher_logits

    def on_reset(self) -> None:
        self._replay = None  # replay starts over, in the order of a fresh run

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_replay"] = None  # a generator cannot be copied or pickled: a copy starts the replay over
        return state

    def _source_batch_size(self) -> int:
        given = self.hparams.source_batch_size
        stream = getattr(self.trainer.datamodule, "batch_size", None) if self._trainer is not None else None
        return given or stream or self.hparams.batch_size or 200

    def _source_stream(self, first_seed: int) -> Iterator[dict]:
        """Source training batches without end: pass k in the order seeded ``first_seed + 2k`` (warm-up
        odd seeds, replay even ones, the prototypes 0)."""
        for k in count():
            empty = True
            for batch in self.source_batches(None, self._source_batch_size(), seed=first_seed + 2 * k):
                empty = False
                yield batch
            if empty:
                raise ValueError(f"{type(self).__name__}: the source data has no training image to warm up on or "
                                 "replay: set warmup_steps: 0 and source_replay: false, or source_free: true")
