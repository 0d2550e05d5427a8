"""The one path from optimizer and schedule arguments to Lightning's optimizer config, used by every
method family and by the evaluations that train (``LinearProbe``, ``FineTune``)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy

from ssl_lightning.optim import (
    build_lr_scheduler,
    cosine_weight_decay,
    create_optimizer,
    global_batch_size,
    scale_lr,
)
from ssl_lightning.strategies import check_optimizer_under_sharding

#: the parameter group whose weight decay ``weight_decay_end`` schedules: never ``no_decay`` (biases,
#: norms) or the online ``probe``, as DINO schedules only its first, regularised group
SCHEDULED_DECAY_GROUP = "weights"


@dataclass(frozen=True)
class OptimizationConfig:
    """Optimizer, learning rate and schedule, as a method's (or evaluation's) typed arguments give them.

    ``lr`` is per 256 images, scaled by ``lr_scaling`` with the global batch ("none": as given).
    ``weight_decay_end``: None keeps the weight decay constant; a value moves the ``weights`` group's
    weight decay from ``weight_decay`` to it on a cosine over the run (:func:`apply_weight_decay_schedule`).
    """

    optimizer: str
    lr: float
    lr_scaling: str = "linear"
    weight_decay: float = 0.0
    weight_decay_end: float | None = None
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
    if config.weight_decay_end is not None and not any(group.get("name") == SCHEDULED_DECAY_GROUP for group in groups):
        raise ValueError(
            f"weight_decay_end schedules the weight decay of the {SCHEDULED_DECAY_GROUP!r} parameter group, but the "
            f"groups are {[group.get('name') for group in groups]}. Set weight_decay_end to None (constant weight decay)."
        )
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
    decay = f"{config.weight_decay:g}"
    if config.weight_decay_end is not None:
        decay += f" -> {config.weight_decay_end:g} (cosine, group {SCHEDULED_DECAY_GROUP!r})"
    rank_zero_info(
        f"Optimizer {config.optimizer}: peak LR {lr:.6g} (lr {config.lr:g} {given}, lr_scaling "
        f"{config.lr_scaling}, global batch {global_batch} = {batch_size} per process x {trainer.world_size} "
        f"process(es) x {trainer.accumulate_grad_batches} accumulated), weight decay {decay}; "
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


def apply_weight_decay_schedule(
    optimizer: torch.optim.Optimizer, step: int, total_steps: int, weight_decay: float, weight_decay_end: float
) -> float:
    """Set the ``weights`` group's weight decay for optimizer step ``step`` (0-indexed) on DINO's cosine
    from ``weight_decay`` to ``weight_decay_end`` (:func:`ssl_lightning.optim.cosine_weight_decay`) and
    return it; the other groups keep theirs. Called before every optimizer step, it depends on the
    step alone, so a resumed run continues the schedule exactly."""
    value = cosine_weight_decay(step, total_steps, weight_decay, weight_decay_end)
    for group in optimizer.param_groups:
        if group.get("name") == SCHEDULED_DECAY_GROUP:
            group["weight_decay"] = value
    return value


def clip_gradients_per_parameter(parameters: Iterable[nn.Parameter], max_norm: float, trainer: L.Trainer) -> None:
    """DINO's gradient clipping (facebookresearch/dino ``utils.clip_gradients``, also iBOT's): each
    parameter's gradient on its own is scaled by ``max_norm / (||g|| + 1e-6)`` where that is below 1.
    This is not Lightning's ``gradient_clip_val``, which clips the norm of all gradients together.

    Under FSDP each process holds a slice of every gradient: the squared norms are summed over the
    sharding process group first, so each tensor is scaled as a whole, as under DDP. Nothing is read
    on the host. Call it after the backward pass, before the optimizer step, on every rank.
    """
    if max_norm <= 0:
        raise ValueError(f"clip_gradients_per_parameter needs max_norm > 0, got {max_norm}")
    trainable = [p for p in parameters if p.requires_grad]
    grads = [p.grad for p in trainable]
    present = [g for g in grads if g is not None]
    model = getattr(trainer.strategy, "model", None)
    sharded = isinstance(model, FullyShardedDataParallel) and model.sharding_strategy != ShardingStrategy.NO_SHARD
    # Under FSDP a rank may hold no slice of any of these parameters (a single small tensor such as
    # iBOT's mask token): it still joins the all-reduce below, or the ranks that hold one would wait.
    if not trainable or not (present or sharded):
        return
    norms = iter(torch._foreach_norm(present) if present else ())  # one multi-tensor kernel for every norm
    zero = torch.zeros((), dtype=torch.float32, device=trainable[0].device)
    # a slot for every parameter, so that every rank's vector lines up (FSDP may leave a slice empty)
    squared_norms = torch.stack([next(norms).float().square() if g is not None else zero for g in grads])
    if sharded:
        dist.all_reduce(squared_norms, group=model.process_group)
    scales = (max_norm / (squared_norms.sqrt() + 1e-6)).clamp(max=1.0)
    for grad, scale in zip(grads, scales):
        if grad is not None:
            grad.mul_(scale.to(grad.dtype))
