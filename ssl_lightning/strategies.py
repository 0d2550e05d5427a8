"""FSDP for the methods: which modules become FSDP units, and building optimizers on sharded parameters.

``configs/strategy/fsdp.yaml`` hands :func:`wrap_blocks_backbone_and_heads` to Lightning's
``FSDPStrategy``; docs/scale.md explains the choices.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_warn
from timm.models import (
    beit,
    cait,
    eva,
    swin_transformer,
    vision_transformer,
    vision_transformer_relpos,
    vision_transformer_sam,
    xcit,
)
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy

from ssl_lightning.components import heads

#: the block classes timm's ViT-family models stack (ViT, DeiT, DINOv2, EVA, BEiT, CaiT, XCiT,
#: Swin, SAM, relative-position ViTs); tests/test_strategies.py checks them against timm's models
TIMM_TRANSFORMER_BLOCKS: tuple[type[nn.Module], ...] = (
    vision_transformer.Block,
    vision_transformer.ResPostBlock,
    vision_transformer.ParallelScalingBlock,
    vision_transformer.DiffParallelScalingBlock,
    vision_transformer.ParallelThingsBlock,
    vision_transformer_relpos.RelPosBlock,
    vision_transformer_relpos.ResPostRelPosBlock,
    vision_transformer_sam.Block,
    eva.EvaBlock,
    eva.EvaBlockPostNorm,
    beit.Block,
    cait.LayerScaleBlock,
    cait.LayerScaleBlockClassAttn,
    xcit.XCABlock,
    xcit.ClassAttentionBlock,
    swin_transformer.SwinTransformerBlock,
)

#: every head class of ``ssl_lightning.components.heads`` (projectors, predictors, classifiers)
HEADS: tuple[type[nn.Module], ...] = tuple(
    cls for cls in vars(heads).values()
    if isinstance(cls, type) and issubclass(cls, nn.Module) and cls.__module__ == heads.__name__
)

FSDP_WRAPPED_PREFIX = "_fsdp_wrapped_module."

#: optimizers whose step depends on whole-tensor norms, which a rank holding a flat slice of each
#: tensor cannot compute (LARS and LAMB trust ratios, AdamP's per-channel projection)
TENSOR_WISE_OPTIMIZERS = ("lars", "lamb", "adamp")


def wrap_blocks_backbone_and_heads(module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
    """FSDP auto-wrap policy: one FSDP unit per timm transformer block, per timm backbone and per head.

    The blocks are the usual units of a transformer: each is gathered just before it runs and
    freed after. The backbone (its embeddings and final norm) and every head are units too, so
    that no unit mixes an EMA teacher's parameters with the student's: the teacher is a deep copy
    of the student's backbone and projector, and the policy looks at nothing but the module
    itself, so teacher units mirror student units one for one, are flattened and sharded
    identically, and the EMA update (elementwise) runs on each rank's local shards without
    communication. Whatever no unit claims (the online probe) stays in the root unit, which the
    teacher never mirrors.

    The signature is FSDP's callable policy: with ``recurse=True`` it asks whether to descend
    into ``module``'s children (always), with ``recurse=False`` whether to wrap ``module``.
    """
    if recurse:
        return True
    # timm.create_model gives the model it builds (and none of its submodules) a pretrained_cfg.
    is_timm_backbone = hasattr(module, "pretrained_cfg")
    return is_timm_backbone or isinstance(module, TIMM_TRANSFORMER_BLOCKS + HEADS)


@contextmanager
def unsharded_parameters(trainer: L.Trainer) -> Iterator[None]:
    """Inside, every parameter of an FSDP-wrapped model has its full shape (it is the same
    ``nn.Parameter`` object as outside). Outside forward and backward, FSDP with ``use_orig_params``
    leaves each parameter a flat 1-D slice of this rank's shard, so a rule such as "parameters of
    at most one dimension get no weight decay" would catch every weight; build parameter groups
    in here. Without FSDP it does nothing."""
    model = getattr(trainer.strategy, "model", None)
    if not isinstance(model, FullyShardedDataParallel):
        yield
        return
    with FullyShardedDataParallel.summon_full_params(model, writeback=False):
        yield


def unsharded_copy(trainer: L.Trainer, module: nn.Module, build: Callable[[], nn.Module]) -> nn.Module:
    """``module`` as a plain module with its full weights, to run outside the training loop.

    Under FSDP a wrapped unit gathers its shards from every rank in its forward, so a unit run on
    rank zero alone (an end-of-fit report) waits forever for the others. Here every rank takes
    part in gathering the full parameters once, and gets an unwrapped copy (made by ``build``,
    the same architecture) holding them. Without FSDP it returns ``module`` itself. Call it on
    every rank.
    """
    if not isinstance(getattr(trainer.strategy, "model", None), FullyShardedDataParallel):
        return module
    with torch.random.fork_rng(devices=[]):  # its initial weights are overwritten: leave the RNG as it was
        copy = build().to(trainer.strategy.root_device)
    with unsharded_parameters(trainer), torch.no_grad():
        # FSDP inserts "_fsdp_wrapped_module." into the names of what it wraps
        gathered = {
            name.replace(FSDP_WRAPPED_PREFIX, ""): tensor
            for name, tensor in [*module.named_parameters(), *module.named_buffers()]
        }
        for name, tensor in [*copy.named_parameters(), *copy.named_buffers()]:
            tensor.copy_(gathered[name])
    return copy


def check_optimizer_under_sharding(optimizer: str, trainer: L.Trainer) -> None:
    """Refuse an optimizer that needs whole tensors when FSDP shards the parameters over processes."""
    strategy = trainer.strategy
    sharded = (
        isinstance(strategy, FSDPStrategy)
        and trainer.world_size > 1
        and strategy.sharding_strategy != ShardingStrategy.NO_SHARD
    )
    if sharded and optimizer in TENSOR_WISE_OPTIMIZERS:
        raise ValueError(
            f"optimizer={optimizer!r} scales each tensor's step by norms of the whole tensor, but under FSDP "
            f"with {trainer.world_size} processes each process holds a flat slice of every tensor. "
            "Use adamw, adam or sgd with FSDP, or train with DDP (--trainer.strategy ddp)."
        )


def warn_if_batchnorm_is_per_process(module: nn.Module, world_size: int) -> None:
    """Warn when several processes train BatchNorm layers that normalise with each process's batch only.

    SimCLR, BYOL and Barlow Twins normalise over the global batch (synchronised BatchNorm across
    devices); with per-process statistics a large run effectively trains with small BatchNorm
    batches, which changes the method.
    """
    if world_size <= 1:
        return
    per_process = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                   and not isinstance(m, nn.SyncBatchNorm)]
    if per_process:
        rank_zero_warn(
            f"{len(per_process)} BatchNorm layers normalise with each of the {world_size} processes' own batch; "
            "the SSL papers synchronise them over the global batch. Set trainer.sync_batchnorm: true (CUDA), "
            "unless per-process statistics are what you want."
        )
