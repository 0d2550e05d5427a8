"""The one path from optimizer and schedule arguments to Lightning's optimizer config, used by every
method family and by the evaluations that train (``LinearProbe``, ``FineTune``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from ssl_lightning.optim import (
    build_lr_scheduler,
    create_optimizer,
    global_batch_size,
    scale_lr,
)
from ssl_lightning.strategies import check_optimizer_under_sharding


@dataclass(frozen=True)
class OptimizationConfig:
    """Optimizer, learning rate and schedule, as a method's (or evaluation's) typed arguments give them.

    ``lr`` is per 256 images, scaled by ``lr_scaling`` with the global batch ("none": as given).
    """

    optimizer: str
    lr: float
    lr_scaling: str = "linear"
    weight_decay: float = 0.0
    momentum: float = 0.9
    schedule: str = "warmup_cosine"
    warmup_epochs: float = 0.0
    warmup_steps: int | None = None
    min_lr_ratio: float = 0.0
    cooldown_steps: int = 0
    const_lr_ratio: float | None = None
    anneal_steps: int = 0
    optimizer_kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_hparams(cls, hparams: dict[str, Any]) -> OptimizationConfig:
        """The configuration held in a module's hyperparameters (the arguments of the same names)."""
        values = {f.name: hparams[f.name] for f in fields(cls) if f.name in hparams}
        values["optimizer_kwargs"] = dict(values.get("optimizer_kwargs") or {})
        return cls(**values)


def configure_optimization(
    config: OptimizationConfig, groups: list[dict], trainer: L.Trainer, batch_size: int
) -> dict:
    """The optimizer over ``groups`` with the LR scaled by the global batch, and a per-step schedule
    over ``trainer.estimated_stepping_batches``; prints the LR and the global batch it came from.

    Each group holds ``name``, ``params`` and ``weight_decay``, and optionally ``base_lr``, its own
    LR per 256 images scaled like ``config.lr`` (the online probe), or ``lr_scale``, a factor of the
    scaled peak LR (layer-wise LR decay), or ``fixed_lr: True``, which keeps the group at its peak
    LR, outside the schedule (SimSiam's predictor). The schedule follows every group's own peak. Build the
    groups inside ``strategies.unsharded_parameters`` (FSDP flattens parameters outside it).
    """
    global_batch = global_batch_size(trainer, batch_size)
    lr = scale_lr(config.lr, global_batch, config.lr_scaling)
    check_optimizer_under_sharding(config.optimizer, trainer)
    groups = [
        {**group, "lr": scale_lr(group.get("base_lr", config.lr), global_batch, config.lr_scaling)
         * group.get("lr_scale", 1.0)}
        for group in groups
    ]
    optimizer = create_optimizer(
        config.optimizer, groups, lr=lr, weight_decay=config.weight_decay, momentum=config.momentum,
        **config.optimizer_kwargs,
    )
    total_steps = int(trainer.estimated_stepping_batches)
    warmup_steps = resolve_warmup_steps(config.warmup_epochs, config.warmup_steps, trainer, total_steps)
    scheduler = build_lr_scheduler(
        optimizer, config.schedule, total_steps=total_steps, warmup_steps=warmup_steps,
        min_lr_ratio=config.min_lr_ratio, cooldown_steps=config.cooldown_steps,
        const_lr_ratio=config.const_lr_ratio, anneal_steps=config.anneal_steps,
    )
    # What a multi-GPU run most needs to see before it spends hours: the LR it really trains with.
    given = "as given" if config.lr_scaling == "none" else "per 256 images"
    rank_zero_info(
        f"Optimizer {config.optimizer}: peak LR {lr:.6g} (lr {config.lr:g} {given}, lr_scaling "
        f"{config.lr_scaling}, global batch {global_batch} = {batch_size} per process x {trainer.world_size} "
        f"process(es) x {trainer.accumulate_grad_batches} accumulated), weight decay {config.weight_decay:g}; "
        f"{total_steps} steps, {warmup_steps} of warm-up, schedule {config.schedule}."
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def resolve_warmup_steps(warmup_epochs: float, warmup_steps: int | None, trainer: L.Trainer, total_steps: int) -> int:
    """``warmup_steps`` when given, else ``warmup_epochs`` in optimizer steps (rounded up); at most
    ``total_steps``."""
    if warmup_steps is not None:
        return min(warmup_steps, total_steps)
    if warmup_epochs == 0:
        return 0
    if trainer.max_epochs is not None and trainer.max_epochs > 0 and trainer.max_steps == -1:
        steps_per_epoch = total_steps / trainer.max_epochs
    else:
        # A step-limited run: epochs are counted in batches of the training dataloader.
        trainer.fit_loop.setup_data()
        batches = trainer.num_training_batches
        if not math.isfinite(batches):
            raise ValueError(
                "warmup_epochs needs a training dataloader with a length; set warmup_steps instead."
            )
        steps_per_epoch = batches / trainer.accumulate_grad_batches
    return min(math.ceil(warmup_epochs * steps_per_epoch), total_steps)
