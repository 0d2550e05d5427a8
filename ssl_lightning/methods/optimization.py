"""Turns a method's optimizer and schedule arguments into Lightning's optimizer config."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from ssl_lightning.optim import (
    build_lr_scheduler,
    create_optimizer,
    global_batch_size,
    param_groups,
    scale_lr,
)
from ssl_lightning.strategies import check_optimizer_under_sharding, unsharded_parameters


@dataclass
class OptimizationConfig:
    optimizer: str
    lr: float
    lr_scaling: str
    weight_decay: float
    momentum: float
    schedule: str
    warmup_epochs: float
    warmup_steps: int | None
    min_lr_ratio: float
    cooldown_steps: int
    const_lr_ratio: float | None
    anneal_steps: int
    probe_lr: float
    optimizer_kwargs: dict[str, Any] = field(default_factory=dict)


def configure_optimization(
    config: OptimizationConfig, student: nn.Module, probe_params: list, trainer: L.Trainer, batch_size: int
) -> dict:
    """Parameter groups (weights / no_decay / probe), LR scaled by the global batch, and a
    per-step schedule over ``trainer.estimated_stepping_batches``."""
    global_batch = global_batch_size(trainer, batch_size)
    lr = scale_lr(config.lr, global_batch, config.lr_scaling)
    check_optimizer_under_sharding(config.optimizer, trainer)
    with unsharded_parameters(trainer):  # FSDP: decide decay by each parameter's real shape
        groups = param_groups(student, config.weight_decay)
    if probe_params:
        groups.append({
            "name": "probe", "params": probe_params, "weight_decay": 0.0,
            "lr": scale_lr(config.probe_lr, global_batch, config.lr_scaling),
        })
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


def logger_writes_this_step(trainer: L.Trainer) -> bool:
    """Whether the logger writes this training step's values (Lightning's every-n-steps rule).

    Values only worth reading in the logs (learning rates, EMA momentum) are logged on those steps
    alone: each ``self.log`` call costs about 0.2 ms, a few percent of a small step.
    """
    if trainer.fast_dev_run:
        return True
    # log_every_n_steps=0: Lightning writes no step at all.
    return trainer.log_every_n_steps > 0 and (trainer.global_step + 1) % trainer.log_every_n_steps == 0


def log_learning_rates(module: L.LightningModule) -> None:
    """``lr/<group>`` of every parameter group, on the steps the logger writes."""
    if not logger_writes_this_step(module.trainer):
        return
    for group in module.trainer.optimizers[0].param_groups:
        module.log(f"lr/{group.get('name', 'group')}", group["lr"], batch_size=1)
