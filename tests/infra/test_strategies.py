"""FSDP pieces that can be checked without a GPU: which modules the wrap policy makes FSDP units,
that an EMA teacher gets the same units as its student, and the optimizer guard under sharding.
Training under FSDP itself needs CUDA: tests/test_fsdp_gpu.py."""

import warnings
from types import SimpleNamespace

import pytest
import timm
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchmetrics import Metric

from ssl_lightning.backbones import build_backbone
from ssl_lightning.components import EMATeacher, FrozenTeacher, OnlineProbe
from ssl_lightning.methods import BYOL
from ssl_lightning.strategies import (
    TIMM_TRANSFORMER_BLOCKS,
    check_optimizer_under_sharding,
    warn_if_batchnorm_is_per_process,
    wrap_blocks_backbone_and_heads,
)

from helpers.fakes import TINY_VIT, tiny_method
from helpers.registry import every_method


def wrapped_by_policy(module: nn.Module) -> bool:
    return wrap_blocks_backbone_and_heads(module=module, recurse=False, nonwrapped_numel=0)


def modules_outside_every_unit(owner: str, module: nn.Module) -> list[str]:
    """Children of a method (and of its teacher's copy) that hold parameters but no FSDP unit would
    take: they would fall into the root unit, which an EMA teacher never mirrors."""
    left_out = []
    for name, child in module.named_children():
        path = f"{owner}.{name}"
        if isinstance(child, EMATeacher):
            left_out += modules_outside_every_unit(f"{path}.module", child.module)
        elif isinstance(child, FrozenTeacher):  # a classifier: one timm unit, or a Sequential (backbone, head)
            if not wrapped_by_policy(child.model):
                left_out += modules_outside_every_unit(f"{path}.model", child.model)
        elif isinstance(child, (nn.Sequential, nn.ModuleList)) and not wrapped_by_policy(child):
            # a teacher's (backbone, projector); a list of heads (LSSKD's per-stage branches): the policy recurses
            left_out += modules_outside_every_unit(path, child)
        elif not (wrapped_by_policy(child) or isinstance(child, (OnlineProbe, Metric))) and next(child.parameters(), None) is not None:
            left_out.append(f"{path} ({type(child).__name__})")
    return left_out


@pytest.mark.parametrize("name", every_method())
def test_every_module_of_every_method_is_an_fsdp_unit_or_the_probe(name):
    # A head class defined outside ssl_lightning/components/heads.py fails here (strategies.HEADS).
    model = tiny_method(name, backbone=TINY_VIT, in_chans=1, num_classes=4, batch_size=8)
    model.configure_model()
    assert modules_outside_every_unit(name, model) == []


def test_a_head_defined_elsewhere_is_caught():
    model = tiny_method("SimCLR", backbone=TINY_VIT, in_chans=1, num_classes=4, batch_size=8)
    model.configure_model()
    model.projector = nn.Sequential(nn.Linear(192, 16), nn.Linear(16, 16))  # not a class of heads.py
    assert modules_outside_every_unit("SimCLR", model) == ["SimCLR.projector.0 (Linear)", "SimCLR.projector.1 (Linear)"]


def test_policy_wraps_each_block_and_the_backbone_of_a_timm_vit():
    backbone = build_backbone("vit_tiny_patch16_224", kwargs={"img_size": 32, "depth": 2})
    assert wrap_blocks_backbone_and_heads(module=backbone, recurse=True, nonwrapped_numel=0)  # always descends
    units = [name for name, module in backbone.named_modules() if wrapped_by_policy(module)]
    assert units == ["", "blocks.0", "blocks.1"]  # "": the backbone itself (embeddings, final norm)


@pytest.mark.parametrize("name", [
    "vit_tiny_patch16_224",              # Block (ViT, DeiT, DINOv2)
    "vit_base_patch16_rpn_224",          # ResPostBlock
    "vit_base_patch16_xp_224",           # ParallelScalingBlock
    "vit_dpwee_patch16_reg1_gap_256",    # DiffParallelScalingBlock
    "vit_small_patch16_18x2_224",        # ParallelThingsBlock
    "vit_relpos_small_patch16_224",      # RelPosBlock
    "vit_relpos_small_patch16_rpn_224",  # ResPostRelPosBlock
    "samvit_base_patch16",
    "eva02_tiny_patch14_224",            # EvaBlock
    "eva02_enormous_patch14_clip_224",   # EvaBlockPostNorm
    "beit_base_patch16_224",
    "cait_xxs24_224",                    # LayerScaleBlock; LayerScaleBlockClassAttn
    "xcit_nano_12_p16_224",              # XCABlock; ClassAttentionBlock
    "swin_tiny_patch4_window7_224",      # blocks inside each stage
])
def test_block_classes_cover_timm_vit_families(name):
    with torch.device("meta"):  # structure only, no memory
        model = timm.create_model(name, num_classes=0)
    stacks = [stack for path, stack in model.named_modules()
              if path.rsplit(".", 1)[-1].endswith("blocks") and isinstance(stack, (nn.Sequential, nn.ModuleList))]
    assert stacks, f"{name} keeps no '...blocks' stack"
    assert all(isinstance(block, TIMM_TRANSFORMER_BLOCKS) for stack in stacks for block in stack)


def fsdp_unit_of_each_parameter(root: nn.Module, wraps) -> dict[int, tuple[str, int, tuple]]:
    """Where FSDP flattens each parameter: the nearest enclosing module that ``wraps`` selects
    (the root otherwise), the position in that unit's flat parameter, and the unit's layout (the
    shapes in order). Units with equal layouts are padded and split over ranks identically."""
    units = [name for name, module in root.named_modules() if name and wraps(module)]
    members: dict[str, list[tuple]] = {}
    placed = {}
    for name, param in root.named_parameters():
        owner = max((unit for unit in units if name.startswith(unit + ".")), key=len, default="")
        placed[id(param)] = (owner, len(members.setdefault(owner, [])))
        members[owner].append(tuple(param.shape))
    return {key: (owner, index, tuple(members[owner])) for key, (owner, index) in placed.items()}


def teacher_mirrors_student(model: BYOL, wraps) -> bool:
    """True when every teacher parameter sits in a unit of its own side laid out like its student
    counterpart's, at the same position: then a rank's local shards of the two match element for
    element, and the EMA update on local shards is exact."""
    where = fsdp_unit_of_each_parameter(model, wraps)
    pairs = zip(model.teacher.module.parameters(), model._online_network().parameters(), strict=True)
    return all(
        where[id(t)][0] != where[id(s)][0] and where[id(t)][1:] == where[id(s)][1:] for t, s in pairs
    )


def tiny_vit_byol() -> BYOL:
    model = BYOL(**TINY_VIT, proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=32, in_chans=1, num_classes=4)
    model.configure_model()
    return model


@pytest.mark.parametrize("batch_norm_apart", [False, True], ids=["policy", "policy+bf16-batchnorm"])
def test_ema_teacher_gets_the_same_fsdp_units_as_the_student(batch_norm_apart):
    # Under mixed precision FSDP also makes each BatchNorm a unit of its own (kept in float32).
    def wraps(module):
        return wrapped_by_policy(module) or (batch_norm_apart and isinstance(module, _BatchNorm))

    assert teacher_mirrors_student(tiny_vit_byol(), wraps)


def test_wrapping_blocks_alone_would_mix_teacher_and_student_in_one_unit():
    # Why the policy also wraps the backbone and the heads: with blocks alone the root unit holds
    # the student's embeddings and projector next to the teacher's copies, so they shard apart.
    assert not teacher_mirrors_student(tiny_vit_byol(), lambda module: isinstance(module, TIMM_TRANSFORMER_BLOCKS))


def sharded_trainer(world_size: int, sharding_strategy: str = "FULL_SHARD") -> SimpleNamespace:
    return SimpleNamespace(strategy=FSDPStrategy(sharding_strategy=sharding_strategy), world_size=world_size)


def test_tensor_wise_optimizers_are_refused_when_fsdp_shards_parameters():
    with pytest.raises(ValueError, match="lars.*flat slice"):
        check_optimizer_under_sharding("lars", sharded_trainer(world_size=2))
    check_optimizer_under_sharding("adamw", sharded_trainer(world_size=2))
    check_optimizer_under_sharding("lars", sharded_trainer(world_size=1))  # one process holds whole tensors
    check_optimizer_under_sharding("lamb", sharded_trainer(world_size=2, sharding_strategy="NO_SHARD"))


def test_several_processes_with_per_process_batchnorm_are_warned_about():
    with_batchnorm = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.warns(UserWarning, match=r"1 BatchNorm layers normalise with each of the 2 processes.*sync_batchnorm"):
        warn_if_batchnorm_is_per_process(with_batchnorm, world_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_batchnorm_is_per_process(with_batchnorm, world_size=1)
        warn_if_batchnorm_is_per_process(nn.SyncBatchNorm.convert_sync_batchnorm(with_batchnorm), world_size=2)
        warn_if_batchnorm_is_per_process(nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)), world_size=2)
