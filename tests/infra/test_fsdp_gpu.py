"""FSDP on one CUDA GPU with configs/strategy/fsdp.yaml's settings: a ViT method trains in
bf16-mixed, its checkpoint is a full state dict that loads without FSDP (``weights_only=True``),
and BYOL's EMA teacher, sharded like the student, follows it exactly, across a resume too.

One process runs FSDP as NO_SHARD; sharding over several ranks (the teacher's shards included)
is tested on two CPU processes in tests/test_fsdp_two_ranks.py, in float32.
"""

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import FSDPStrategy
from torch.distributed.fsdp import FullyShardedDataParallel

from ssl_lightning.callbacks import KNNReport
from ssl_lightning.cli import main
from ssl_lightning.export import load_backbone
from ssl_lightning.methods import METHODS
from ssl_lightning.optim import cosine_momentum
from ssl_lightning.strategies import FSDP_WRAPPED_PREFIX, wrap_blocks_backbone_and_heads

from helpers.fakes import TINY_VIT, fake_loader, tiny_method
from helpers.paths import CONFIGS
from helpers.registry import REPRESENTATIVES

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

MOMENTUM = {"base_momentum": 0.5, "final_momentum": 1.0}  # a teacher that visibly moves in two steps
MIRRORED = {"teacher.module.0.": "backbone.", "teacher.module.1.": "projector."}  # BYOL's teacher -> student


def vit_method(name: str):
    return tiny_method(name, backbone=TINY_VIT, **(MOMENTUM if name == "BYOL" else {}), in_chans=1, num_classes=4,
                       batch_size=8, optimizer="adamw", lr=1e-3)


class FullBackboneAtEnd(L.Callback):
    """The trained backbone's parameters, gathered by FSDP while the model is still wrapped."""

    def on_train_end(self, trainer, pl_module):
        with FullyShardedDataParallel.summon_full_params(trainer.strategy.model, writeback=False):
            self.weights = {
                name.replace(FSDP_WRAPPED_PREFIX, ""): param.detach().cpu().clone()
                for name, param in pl_module.backbone.named_parameters()
            }


def fit_under_fsdp(model, directory: Path, ckpt_path: Path | None = None) -> tuple[L.Trainer, dict]:
    """Two optimizer steps (2 batches of 8) with a full-state-dict checkpoint after each: step=1.ckpt, step=2.ckpt."""
    final = FullBackboneAtEnd()
    trainer = L.Trainer(
        accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=2,
        strategy=FSDPStrategy(auto_wrap_policy=wrap_blocks_backbone_and_heads, state_dict_type="full"),
        callbacks=[ModelCheckpoint(dirpath=directory, filename="{step}", every_n_train_steps=1, save_top_k=-1), final],
        logger=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(
        model, fake_loader(length=16), val_dataloaders=fake_loader(length=8), ckpt_path=ckpt_path, weights_only=True,
    )
    return trainer, final.weights


def saved_state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def assert_teacher_is_ema(before: dict, after: dict, momentum: float) -> None:
    """``after``'s teacher = m * ``before``'s teacher + (1 - m) * ``after``'s student, tensor by tensor."""
    reference = vit_method("BYOL")
    reference.configure_model()
    parameters = {name for name, _ in reference.named_parameters()}
    teacher_keys = [key for key in after if key.startswith(tuple(MIRRORED))]
    assert teacher_keys
    for key in teacher_keys:
        prefix = next(p for p in MIRRORED if key.startswith(p))
        student = after[MIRRORED[prefix] + key[len(prefix):]]
        if not after[key].is_floating_point():  # BatchNorm's num_batches_tracked is copied
            assert torch.equal(after[key], student), key
            continue
        # Parameters follow on FSDP's float32 shards; buffers may be held in bf16 while training.
        tolerance = {} if key in parameters else {"rtol": 1e-2, "atol": 1e-2}
        expected = momentum * before[key] + (1 - momentum) * student
        torch.testing.assert_close(after[key], expected, msg=key, **tolerance)


@pytest.mark.parametrize("name", sorted(REPRESENTATIVES.values()))
def test_vit_method_trains_under_fsdp_and_its_checkpoint_loads_without_it(name, tmp_path):
    trainer, trained = fit_under_fsdp(vit_method(name), tmp_path)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    first, last = saved_state(tmp_path / "step=1.ckpt"), saved_state(tmp_path / "step=2.ckpt")
    qkv = "backbone.blocks.0.attn.qkv.weight"
    assert last[qkv].shape == (3 * 192, 192) and not torch.equal(first[qkv], last[qkv])  # full tensors; it trained
    assert not any(FSDP_WRAPPED_PREFIX in key for key in last)
    # A plain module (no FSDP) loads the checkpoint strictly: same names, full shapes.
    restored = METHODS[name].load_from_checkpoint(tmp_path / "step=2.ckpt", weights_only=True)
    for backbone in (restored.backbone, load_backbone(tmp_path / "step=2.ckpt")):
        loaded = dict(backbone.named_parameters())
        assert loaded.keys() == trained.keys()
        for key, value in trained.items():
            assert torch.equal(loaded[key], value), key


def test_ema_teacher_follows_the_student_exactly_under_fsdp(tmp_path):
    trainer, _ = fit_under_fsdp(vit_method("BYOL"), tmp_path)
    total = int(trainer.estimated_stepping_batches)
    first, last = saved_state(tmp_path / "step=1.ckpt"), saved_state(tmp_path / "step=2.ckpt")
    assert_teacher_is_ema(first, last, cosine_momentum(1, total, **MOMENTUM))  # the update after step index 1
    assert not torch.equal(last["teacher.module.0.blocks.0.attn.qkv.weight"], last["backbone.blocks.0.attn.qkv.weight"])


def test_resuming_under_fsdp_restores_the_teacher(tmp_path):
    fit_under_fsdp(vit_method("BYOL"), tmp_path / "first")
    trainer, _ = fit_under_fsdp(vit_method("BYOL"), tmp_path / "resumed", ckpt_path=tmp_path / "first" / "step=1.ckpt")
    assert trainer.global_step == 2
    # The resumed step moved the teacher loaded from step=1.ckpt, not a fresh copy of the student.
    before, after = saved_state(tmp_path / "first" / "step=1.ckpt"), saved_state(tmp_path / "resumed" / "step=2.ckpt")
    assert_teacher_is_ema(before, after, cosine_momentum(1, int(trainer.estimated_stepping_batches), **MOMENTUM))


def test_fsdp_config_trains_a_vit_from_the_command_line(tmp_path):
    cli = main([
        "fit", "--config", str(CONFIGS / "quickstart.yaml"), "--config", str(CONFIGS / "strategy" / "fsdp.yaml"),
        "--model.init_args.backbone", "vit_tiny_patch16_224",
        "--model.init_args.backbone_kwargs", json.dumps({"img_size": 32, "patch_size": 8, "depth": 2}),
        "--model.init_args.cifar_stem", "false", "--model.init_args.channels_last", "false",
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2",
        "--trainer.enable_progress_bar", "false", "--run_name", "fsdp", "--root", str(tmp_path),
    ])
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    assert "val/knn_top1" in cli.trainer.callback_metrics
    assert "trained backbone" in next(cb for cb in cli.trainer.callbacks if isinstance(cb, KNNReport)).results
    backbone = load_backbone(tmp_path / "fsdp" / "checkpoints" / "last.ckpt")
    assert backbone.blocks[0].attn.qkv.weight.shape == (3 * 192, 192)
