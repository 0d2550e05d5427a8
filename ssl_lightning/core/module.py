"""``TrainModule``: what every trainable method shares, whatever its family.

A family base (``methods.ssl.SSLMethod``, ``methods.supervised.SupervisedMethod``) adds its
contract; a method adds its heads (:meth:`TrainModule.build_heads`) and its loss
(:meth:`TrainModule.shared_step`). docs/architecture.md shows where each piece lives.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import lightning as L
import torch
from torch import nn

from ssl_lightning.backbones import (
    build_backbone,
    enable_grad_checkpointing,
    feature_dim,
)
from ssl_lightning.core.data_link import (
    DataFacts,
    check_view_count,
    read_batch_size,
    read_data_facts,
    require_views,
)
from ssl_lightning.core.nonfinite import NonFiniteGuard
from ssl_lightning.core.optimization import (
    OptimizationConfig,
    apply_weight_decay_schedule,
    configure_optimization,
)
from ssl_lightning.core.step_logging import log_learning_rates, logger_writes_this_step
from ssl_lightning.optim import cosine_weight_decay, param_groups
from ssl_lightning.strategies import unsharded_parameters

#: what ``on_save_checkpoint`` copies from the DataModule into ``checkpoint["data_facts"]``
SAVED_DATA_FACTS = ("in_chans", "image_size", "mean", "std")


def saved_data_facts(datamodule) -> dict:
    """The DataModule's ``SAVED_DATA_FACTS`` as a checkpoint stores them (``data_facts``: lists, no None)."""
    return {key: list(value) if isinstance(value, tuple) else value
            for key in SAVED_DATA_FACTS if (value := getattr(datamodule, key, None)) is not None}


class TrainModule(L.LightningModule):
    """Base of every trainable method: the backbone, the DataModule's facts, the optimizer and its
    schedule, the non-finite-loss guard, and the logging of losses and learning rates.

    Subclasses implement:
      * ``build_heads(feat_dim)``: the modules after the backbone (projector, classifier, teacher),
        created once the backbone exists, inside ``configure_model``;
      * ``shared_step(batch) -> dict``: ``loss``, named terms ``loss/<term>`` (the same every step),
        ``feats`` (the backbone features of ``views[0]``) and whatever the family reads besides;
      * optionally ``on_optimizer_step(step)`` (teacher updates) and ``training_extras`` (what a
        family trains or logs beside the method's loss).

    Modules are built lazily in ``configure_model`` so that a method made in Python picks up
    ``in_chans`` / ``num_classes`` / ``batch_size`` / ``image_size`` from the DataModule in ``setup``.

    Args:
        backbone: timm name, ``torchvision.<resnet>``, or an ``nn.Module`` (not saved in
            hyperparameters: pass it again to ``load_from_checkpoint``).
        backbone_kwargs: extra builder arguments (e.g. small ResNet layers and channels).
        cifar_stem: 3x3 stride-1 stem without max-pool for 32x32 images.
        in_chans, num_classes, batch_size, image_size: taken from the DataModule when None
            (LightningCLI links them).
        optimizer: "lars", "sgd", "adamw", "lamb", "adamp" or "adam" (timm's implementations; "sgd"
            without Nesterov unless ``optimizer_kwargs`` says ``nesterov: true``).
        lr: peak learning rate per 256 images, scaled by ``lr_scaling`` with the global batch
            (batch x processes x accumulated batches); "none" uses it as given.
        weight_decay: applied to weights, never to biases and normalisation parameters.
        weight_decay_end: None keeps ``weight_decay`` constant; a value moves the ``weights`` group's
            weight decay from ``weight_decay`` to it on a cosine over the optimizer steps (DINO's
            0.04 -> 0.4), set before every step from the global step (so resuming continues it) and
            logged as ``wd/weights`` on logger steps.
        momentum: of sgd and lars.
        optimizer_kwargs: further optimizer arguments (``betas``, ``eps``, ``trust_coeff``, ``nesterov``).
        schedule: per optimizer step: "warmup_cosine", "infinite" (warm-up, cosine cool-down,
            constant, exponential anneal) or "constant".
        warmup_epochs / warmup_steps: linear warm-up length (steps win when given).
        min_lr_ratio, cooldown_steps, const_lr_ratio, anneal_steps: schedule shape, ratios relative
            to each parameter group's own peak (see ``ssl_lightning.optim.build_lr_scheduler``).
        channels_last: store convolution weights channels-last (NHWC), which PyTorch's CPU and
            tensor-core kernels run faster; outputs are unchanged.
        grad_checkpointing: recompute the backbone's activations in the backward pass to save
            memory (timm's ``set_grad_checkpointing``; LayerNorm backbones such as ViTs only).
        compile: compile the backbone and heads (teacher included) with ``torch.compile`` in place
            (``nn.Module.compile``), so parameter names and checkpoints are those of an eager run.
            The first steps, and the first validation step, pay the compilation.
        on_nonfinite_loss: what a NaN/inf loss on any rank does. "raise": stop with an error naming
            the step and loss terms, read on logger steps, before validation and checkpoints (no
            host sync per step; no checkpoint holds a later state). "skip": read every step, and
            drop that optimizer step on every rank (no weight or optimizer state changes; the LR
            schedule and an EMA teacher still move). See docs/reliability.md.
    """

    #: views per image that ``shared_step`` consumes: an int, or (min, max) for multi-crop methods;
    #: a DataModule whose recipe makes another count fails before training
    expected_views: int | tuple[int, int] = 1

    #: init arguments that only Python can give (an ``nn.Module``): never saved as hyperparameters
    python_only_arguments: tuple[str, ...] = ()

    def __init__(
        self,
        backbone: str | nn.Module = "resnet18",
        backbone_kwargs: dict[str, Any] | None = None,
        cifar_stem: bool = False,
        in_chans: int | None = None,
        num_classes: int | None = None,
        batch_size: int | None = None,
        image_size: int | None = None,
        optimizer: Literal["lars", "sgd", "adamw", "lamb", "adamp", "adam"] = "lars",
        lr: float = 0.3,
        lr_scaling: Literal["linear", "sqrt", "none"] = "linear",
        weight_decay: float = 1e-6,
        weight_decay_end: float | None = None,
        momentum: float = 0.9,
        optimizer_kwargs: dict[str, Any] | None = None,
        schedule: Literal["warmup_cosine", "infinite", "constant"] = "warmup_cosine",
        warmup_epochs: float = 10.0,
        warmup_steps: int | None = None,
        min_lr_ratio: float = 0.0,
        cooldown_steps: int = 0,
        const_lr_ratio: float | None = None,
        anneal_steps: int = 0,
        channels_last: bool = False,
        grad_checkpointing: bool = False,
        compile: bool = False,
        on_nonfinite_loss: Literal["raise", "skip"] = "raise",
    ):
        super().__init__()
        custom_backbone = isinstance(backbone, nn.Module)
        # Collects the arguments of every __init__ up the class hierarchy (the method's own too); modules
        # given in Python stay out (checkpoints load weights_only).
        self.save_hyperparameters(ignore=[*(["backbone"] if custom_backbone else []), *self.python_only_arguments])
        self._custom_backbone = backbone if custom_backbone else None
        self.backbone: nn.Module | None = None
        self.nonfinite = NonFiniteGuard(on_nonfinite_loss, type(self).__name__)
        self._discard_gradients = False  # set by a skipped non-finite step
        #: training images in the DataModule (None without one, or before its setup): sizes per-sample memories
        self.num_train_images: int | None = None

    # ----------------------------------------------------------------- building
    def setup(self, stage: str) -> None:
        facts = read_data_facts(self.trainer)
        if facts is not None:
            self.adopt_data_facts(facts)

    def adopt_data_facts(self, facts: DataFacts) -> None:
        """Fill the data arguments left None from the DataModule, and check its view count."""
        for key in ("in_chans", "num_classes", "batch_size", "image_size"):
            ours, theirs = self.hparams.get(key), getattr(facts, key)
            if ours is None and theirs is not None:
                self.hparams[key] = theirs
        if facts.num_views is not None:
            check_view_count(type(self).__name__, self.expected_views, facts.num_views)
        self.num_train_images = facts.num_train_images

    def configure_model(self) -> None:
        if self.backbone is not None:  # Lightning calls this hook once per stage
            return
        self.backbone = self._custom_backbone if self._custom_backbone is not None else self.build_fresh_backbone()
        if self.hparams.channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        if self.hparams.grad_checkpointing:
            enable_grad_checkpointing(self.backbone)
        self.feat_dim = feature_dim(self.backbone, self.hparams.in_chans or 3, self.hparams.image_size or 32)
        self.build_heads(self.feat_dim)
        if self.hparams.compile:
            # What a family adds after this (a probe, metrics) stays eager: a single Linear layer
            # gains nothing, and a torchmetrics object must not be compiled.
            for module in self.children():
                module.compile()

    def build_fresh_backbone(self) -> nn.Module:
        """A newly initialised backbone of this method's architecture (also the random-init baseline)."""
        if self._custom_backbone is not None:
            fresh = copy.deepcopy(self._custom_backbone)
            for module in fresh.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
            return fresh
        return build_backbone(
            self.hparams.backbone, cifar_stem=self.hparams.cifar_stem, in_chans=self.hparams.in_chans or 3,
            kwargs=self.hparams.backbone_kwargs,
        )

    def build_heads(self, feat_dim: int) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement build_heads(feat_dim).")

    # ----------------------------------------------------------------- the method's pieces
    def shared_step(self, batch: dict) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} must implement shared_step(batch).")

    def training_extras(self, batch: dict, out: dict[str, torch.Tensor], logs_now: bool) -> torch.Tensor | None:
        """What a family trains or logs beside the method's loss, after the loss is guarded and logged.

        Returns a loss to add to the method's (the online probe's, which has its own parameters and
        must not count as the method's ``train/loss``), or None. ``logs_now``: the logger writes
        this step, the only kind of step on which a device value may be read on the host.
        """
        return None

    def on_optimizer_step(self, step: int) -> None:
        """Called after optimizer step ``step`` (0-indexed); teacher updates go here."""

    def global_batch_size(self) -> int:
        """Images per optimizer micro-step over all processes (batch x processes): the unit queues
        are sized in. Needs the Trainer."""
        return (self.hparams.batch_size or read_batch_size(self.trainer)) * self.trainer.world_size

    def parameter_groups(self) -> list[dict]:
        """The optimizer's groups (see ``core.optimization.configure_optimization``): ``weights`` and
        ``no_decay`` of every child module; a teacher's frozen parameters drop out."""
        return param_groups(nn.ModuleList(self.children()), self.hparams.weight_decay)

    # ----------------------------------------------------------------- Lightning hooks
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        require_views(batch, type(self).__name__)
        out = self.shared_step(batch)
        loss = out["loss"]
        # Host syncs happen only on the steps the logger writes (see NonFiniteGuard).
        logs_now, skipped = logger_writes_this_step(self.trainer), False
        if self.nonfinite.policy == "skip":
            # Every rank still runs the backward, so DDP's all-reduce completes, and
            # on_before_optimizer_step throws the gradients away (of every accumulated micro-batch).
            skipped = self.nonfinite.skips(out, self.trainer)
            self._discard_gradients |= skipped
        else:
            self.nonfinite.observe(out, self.trainer)
            if logs_now:
                self.nonfinite.check(self.trainer)
        if not skipped:
            batch_size = batch["views"][0].shape[0]
            self.log("train/loss", loss, prog_bar=True, batch_size=batch_size, sync_dist=True)
            if logs_now:  # read only in the logs: not worth a log call (~0.2 ms) on every step
                for name, value in out.items():
                    if name.startswith("loss/"):
                        self.log(f"train/{name}", value, batch_size=batch_size, sync_dist=True)
        extra = self.training_extras(batch, out, logs_now)
        return loss if extra is None else loss + extra

    def optimizer_step(self, *args, **kwargs) -> None:
        # Lightning calls this once per real optimizer step, never per accumulated micro-batch.
        step = self.trainer.global_step
        hp = self.hparams
        if hp.weight_decay_end is not None:  # from the step alone, so a resumed run continues the schedule
            apply_weight_decay_schedule(self.trainer.optimizers[0], step, int(self.trainer.estimated_stepping_batches),
                                        hp.weight_decay, hp.weight_decay_end)
        super().optimizer_step(*args, **kwargs)
        self.on_optimizer_step(step)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if not self._discard_gradients:
            return
        self._discard_gradients = False
        # Torch optimizers leave a parameter without .grad untouched (no update, no weight decay, no
        # moment decay), so this makes the step a no-op. With a GradScaler (16-mixed) the gradients
        # stay: they are non-finite, so the scaler skips the step itself and lowers its scale.
        if getattr(self.trainer.precision_plugin, "scaler", None) is None:
            optimizer.zero_grad(set_to_none=True)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        log_learning_rates(self)
        hp = self.hparams
        if hp.weight_decay_end is not None and logger_writes_this_step(self.trainer):
            # the value this step's update uses (optimizer_step sets it from the same global step)
            total_steps = int(self.trainer.estimated_stepping_batches)
            decay = cosine_weight_decay(self.trainer.global_step, total_steps, hp.weight_decay, hp.weight_decay_end)
            self.log("wd/weights", decay, batch_size=1)

    def configure_optimizers(self):
        with unsharded_parameters(self.trainer):  # FSDP: decide decay by each parameter's real shape
            groups = self.parameter_groups()
        return configure_optimization(
            OptimizationConfig.from_hparams(self.hparams), groups, self.trainer,
            self.hparams.batch_size or read_batch_size(self.trainer),
        )

    def on_validation_start(self) -> None:
        self.nonfinite.check(self.trainer)

    def on_train_end(self) -> None:
        self.nonfinite.check(self.trainer)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self._trainer is not None:
            self.nonfinite.check(self._trainer)  # never a checkpoint of weights a NaN has reached
        # Export and offline evaluation need the input the backbone was trained on, which the
        # DataModule knows but the method's hyperparameters do not (mean, std).
        datamodule = getattr(self._trainer, "datamodule", None)
        if datamodule is not None:
            checkpoint["data_facts"] = saved_data_facts(datamodule)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # load_from_checkpoint builds the modules; a resumed Trainer run has built them already.
        self.configure_model()
