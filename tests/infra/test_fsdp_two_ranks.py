"""FSDP sharding over two CPU processes (gloo), with configs/strategy/fsdp.yaml's strategy.

- Every method with a ViT ends with the weights DDP gives (to float32 rounding), with gradient
  checkpointing and with compiled modules too.
- BYOL's EMA teacher, sharded like the student, follows it exactly (float32 and bf16-mixed) and
  survives a resume that re-shards a full checkpoint.
- The kNN monitor, the end-of-fit kNN report and ``predict``'s embeddings give DDP's numbers.

Lightning's ``FSDPStrategy`` demands CUDA. ``GlooFSDPStrategy`` below changes only that: it gets
past Lightning's accelerator check and tells FSDP its compute device is the CPU (FSDP otherwise
looks for an accelerator). Wrapping, sharding, the training step, optimizer, full-state-dict
checkpoints and resuming are Lightning's and FSDP's own code. The processes are started by
tests/gloo.py (``torch.multiprocessing.spawn``); with ``LOCAL_RANK`` set, Lightning adopts them
instead of launching its own.
"""

import importlib
import os
from pathlib import Path
from unittest import mock

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
from torch.distributed.fsdp import FullyShardedDataParallel

from ssl_lightning.callbacks import EmbeddingWriter, KNNCallback, KNNReport
from ssl_lightning.datamodules import Digits
from ssl_lightning.optim import cosine_momentum
from ssl_lightning.strategies import unsharded_copy

from helpers.fakes import TINY_VIT, fake_loader, tiny_method
from helpers.gloo import WORLD_SIZE, run_on_two_ranks
from helpers.paths import CONFIGS
from helpers.registry import costly_paths

pytestmark = [pytest.mark.ddp, pytest.mark.timeout(180)]

FSDP_CONFIG = yaml.safe_load((CONFIGS / "strategy/fsdp.yaml").read_text())["trainer"]

STEPS = 3
MOMENTUM = {"base_momentum": 0.5, "final_momentum": 1.0}  # a teacher that visibly moves each step
DIGITS_VIT = {"backbone": "vit_tiny_patch16_224", "backbone_kwargs": {"img_size": 32, "patch_size": 8, "depth": 2}}
MIRRORED = {"teacher.module.0.": "backbone.", "teacher.module.1.": "projector."}  # BYOL's teacher -> student


class FullyShardedDataParallelOnCPU(FullyShardedDataParallel):
    def __init__(self, *args, device_id=None, **kwargs):
        super().__init__(*args, device_id=torch.device("cpu"), **kwargs)


class GlooFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy on the CPU. Lightning refuses a CPU accelerator for
    ``type(strategy) is FSDPStrategy`` only, so a subclass passes; and Lightning hands FSDP
    ``device_id=None`` for the CPU, which FSDP reads as "the accelerator", so the wrapping is
    told the CPU (auto-wrapped units inherit the root's ``device_id``)."""

    def _setup_model(self, model):
        if any(isinstance(module, FullyShardedDataParallel) for module in model.modules()):
            return super()._setup_model(model)  # wrapped by an earlier fit: Lightning keeps the wrapping
        with mock.patch("torch.distributed.fsdp.FullyShardedDataParallel", FullyShardedDataParallelOnCPU):
            return super()._setup_model(model)


def vit_method(name: str, **kwargs):
    # weight decay large enough that a parameter put in the wrong (decay / no-decay) group would show
    return tiny_method(name, backbone=TINY_VIT, **(MOMENTUM if name == "BYOL" else {}), in_chans=1, num_classes=4,
                       batch_size=8, optimizer="sgd", lr=4.0, warmup_steps=0, weight_decay=0.1, **kwargs)


def fsdp_as_configured() -> GlooFSDPStrategy:
    """The strategy of configs/strategy/fsdp.yaml (its wrap policy, sharding and checkpoint type)."""
    strategy = FSDP_CONFIG["strategy"]
    assert strategy["class_path"] == "lightning.pytorch.strategies.FSDPStrategy"
    init_args = dict(strategy["init_args"])
    module, name = init_args["auto_wrap_policy"].rsplit(".", 1)
    init_args["auto_wrap_policy"] = getattr(importlib.import_module(module), name)
    return GlooFSDPStrategy(**init_args)


def two_rank_trainer(strategy: str, **kwargs) -> L.Trainer:
    """A Trainer on this process and the other one of the gloo group, under FSDP or DDP."""
    os.environ["LOCAL_RANK"] = str(torch.distributed.get_rank())  # Lightning adopts these processes
    return L.Trainer(
        accelerator="cpu", devices=WORLD_SIZE, logger=False, enable_progress_bar=False, enable_model_summary=False,
        # DDP broadcasts rank 0's BatchNorm running statistics each step unless told not to; FSDP never does.
        strategy=fsdp_as_configured() if strategy == "fsdp" else DDPStrategy(broadcast_buffers=False),
        **kwargs,
    )


def fit(name: str, strategy: str, directory: str, options: dict) -> dict:
    """One rank's part of a two-process fit (8 images per rank and step) with a full checkpoint
    after every step (``step=<n>.ckpt``); ``options``: ``max_steps``, ``resume_from``,
    ``precision``, ``grad_checkpointing`` and ``compile``. Returns how many parameter elements
    this rank holds and whether the backbone recomputes its blocks."""
    torch.manual_seed(0)  # every rank builds the same model: FSDP does not broadcast it
    trainer = two_rank_trainer(
        strategy, max_steps=options["max_steps"], limit_val_batches=0, precision=options["precision"],
        callbacks=[ModelCheckpoint(dirpath=directory, filename="{step}", every_n_train_steps=1, save_top_k=-1)],
    )
    model = vit_method(name, grad_checkpointing=options["grad_checkpointing"], compile=options["compile"])
    trainer.fit(model, fake_loader(length=64), ckpt_path=options["resume_from"], weights_only=True)
    return {
        # With use_orig_params each parameter is a view of this rank's shard (empty where it holds none).
        "held": sum(p.numel() for p in trainer.strategy.model.parameters()),
        "recomputes": model.backbone.grad_checkpointing,  # timm's flag, read through FSDP's wrapper
    }


def fit_and_predict_digits(strategy: str, embeddings: str) -> dict:
    """A short BYOL fit on Digits with the kNN monitor and the end-of-fit kNN report (the
    quickstart's callbacks), then ``predict`` writing the validation embeddings to ``embeddings``."""
    torch.manual_seed(0)
    report = KNNReport(k=20)
    trainer = two_rank_trainer(strategy, max_epochs=1, limit_train_batches=2, limit_val_batches=2,
                               callbacks=[KNNCallback(k=20), report, EmbeddingWriter(embeddings)],
                               enable_checkpointing=False)
    model = tiny_method("BYOL", backbone=DIGITS_VIT, optimizer="sgd", lr=4.0, warmup_steps=0)
    data = Digits(batch_size=32, num_workers=0, seed=0)
    trainer.fit(model, data)
    backbone = unsharded_copy(trainer, model.backbone, model.build_fresh_backbone)  # on every rank
    results = {"knn_top1": float(trainer.callback_metrics["val/knn_top1"]), "report": report.results,
               "backbone": dict(backbone.state_dict())}
    trainer.predict(model, datamodule=data, return_predictions=False)
    return results


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """``fitted(name, strategy, ...)``: the folder of that two-process fit's checkpoints and what
    each rank returned; every distinct fit runs once per module."""
    runs = {}

    def run(name: str, strategy: str, max_steps: int = STEPS, resume_from: Path | None = None,
            precision: str = "32-true", grad_checkpointing: bool = False, compile: bool = False):
        options = {"max_steps": max_steps, "resume_from": str(resume_from) if resume_from else None,
                   "precision": precision, "grad_checkpointing": grad_checkpointing, "compile": compile}
        key = (name, strategy, *options.values())
        if key not in runs:
            directory = tmp_path_factory.mktemp(f"{name}-{strategy}")
            checkpoints = directory / "checkpoints"
            runs[key] = checkpoints, run_on_two_ranks(fit, directory, name, strategy, str(checkpoints), options)
        return runs[key]

    return run


def saved_state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.parametrize("name", costly_paths())
def test_sharded_fit_ends_with_the_weights_ddp_gives(name, fitted):
    sharded, ranks = fitted(name, "fsdp")
    held = [rank["held"] for rank in ranks]
    replicated, _ = fitted(name, "ddp")
    unwrapped = vit_method(name)
    unwrapped.configure_model()  # builds the backbone and heads
    full = sum(p.numel() for p in unwrapped.parameters())
    assert sum(held) == full and max(held) < 0.51 * full  # each rank held half of every unit

    first, last = saved_state(sharded / "step=1.ckpt"), saved_state(sharded / f"step={STEPS}.ckpt")
    expected = saved_state(replicated / f"step={STEPS}.ckpt")
    assert last.keys() == expected.keys()  # the full checkpoint has the usual names...
    for key, value in expected.items():
        torch.testing.assert_close(last[key], value, msg=key)  # ...shapes and values
    qkv = "backbone.blocks.0.attn.qkv.weight"
    assert not torch.equal(first[qkv], last[qkv])  # it trained


def test_gradient_checkpointing_under_fsdp_changes_no_weight(fitted):
    # The blocks are FSDP units; recomputing one in the backward pass gathers its shards again.
    checkpointed, ranks = fitted("BYOL", "fsdp", grad_checkpointing=True)
    assert all(rank["recomputes"] for rank in ranks)
    replicated, _ = fitted("BYOL", "ddp")
    last, expected = saved_state(checkpointed / f"step={STEPS}.ckpt"), saved_state(replicated / f"step={STEPS}.ckpt")
    for key, value in expected.items():
        torch.testing.assert_close(last[key], value, msg=key)


@pytest.mark.slow
def test_compiled_modules_under_fsdp_end_with_the_eager_ddp_weights(fitted, monkeypatch):
    # The backbone and heads are compiled in place before FSDP wraps them (about 20 s of compiling).
    # The processes compile in-process, as in tests/test_compile.py's DDP test.
    monkeypatch.setenv("TORCHINDUCTOR_COMPILE_THREADS", "1")
    compiled, _ = fitted("BYOL", "fsdp", compile=True)
    replicated, _ = fitted("BYOL", "ddp")
    last, expected = saved_state(compiled / f"step={STEPS}.ckpt"), saved_state(replicated / f"step={STEPS}.ckpt")
    assert last.keys() == expected.keys()  # compiled in place: the eager parameter names
    for key, value in expected.items():
        torch.testing.assert_close(last[key], value, rtol=1e-4, atol=1e-4, msg=key)


def assert_teacher_is_ema(before: dict, after: dict, momentum: float) -> None:
    """``after``'s teacher = m * ``before``'s teacher + (1 - m) * ``after``'s student, tensor by tensor."""
    teacher_keys = [key for key in after if key.startswith(tuple(MIRRORED))]
    assert len(teacher_keys) > 30
    for key in teacher_keys:
        prefix = next(p for p in MIRRORED if key.startswith(p))
        student = after[MIRRORED[prefix] + key[len(prefix):]]
        if after[key].is_floating_point():
            torch.testing.assert_close(after[key], momentum * before[key] + (1 - momentum) * student, msg=key)
        else:  # BatchNorm's num_batches_tracked is copied
            assert torch.equal(after[key], student), key


@pytest.mark.parametrize("precision", ["32-true", FSDP_CONFIG["precision"]])
def test_sharded_ema_teacher_follows_the_student_exactly(precision, fitted):
    # Under bf16-mixed FSDP computes with bf16 copies; the sharded weights and the teacher stay float32.
    sharded, _ = fitted("BYOL", "fsdp", precision=precision)
    before, after = saved_state(sharded / f"step={STEPS - 1}.ckpt"), saved_state(sharded / f"step={STEPS}.ckpt")
    # max_steps (shorter than the epoch of 4 steps) is the schedule's length
    assert_teacher_is_ema(before, after, cosine_momentum(STEPS - 1, STEPS, **MOMENTUM))
    assert not torch.equal(after["teacher.module.0.blocks.0.attn.qkv.weight"], after["backbone.blocks.0.attn.qkv.weight"])


def test_resuming_on_two_ranks_reshards_the_teacher(fitted):
    sharded, _ = fitted("BYOL", "fsdp")
    resumed, _ = fitted("BYOL", "fsdp", max_steps=2, resume_from=sharded / "step=1.ckpt")
    # The resumed step moved the teacher loaded (and re-sharded) from step=1.ckpt.
    assert_teacher_is_ema(saved_state(sharded / "step=1.ckpt"), saved_state(resumed / "step=2.ckpt"),
                          cosine_momentum(1, 2, **MOMENTUM))


def test_knn_monitor_report_and_predicted_embeddings_under_fsdp_match_ddp(tmp_path):
    # The report runs the backbone on rank zero alone, after fit: under FSDP every rank first
    # gathers it (a sharded unit run on one rank would wait for the others forever).
    results = {}
    for strategy in ("fsdp", "ddp"):
        (tmp_path / strategy).mkdir()
        embeddings = str(tmp_path / strategy / "embeddings.npz")
        results[strategy] = run_on_two_ranks(fit_and_predict_digits, tmp_path / strategy, strategy, embeddings)
    sharded, replicated = results["fsdp"][0], results["ddp"][0]
    assert sharded["report"].keys() == replicated["report"].keys() and len(sharded["report"]) == 3
    one_query = 100 / 360  # Digits' validation split; float rounding may move one neighbour
    for key, top1 in replicated["report"].items():
        assert abs(sharded["report"][key] - top1) <= one_query, key
    assert abs(sharded["knn_top1"] - replicated["knn_top1"]) <= 1 / 64  # a fraction; two validation batches of 32
    # The gathered copy on every rank holds the trained weights (DDP's own module here).
    for rank in results["fsdp"]:
        assert rank["backbone"].keys() == replicated["backbone"].keys()
        for key, value in replicated["backbone"].items():
            torch.testing.assert_close(rank["backbone"][key], value, msg=key)
    # predict: every validation image once, with the backbone features DDP gives. (The projector's
    # "embeds" pass BatchNorm running statistics, which each process keeps for itself.)
    written = {strategy: np.load(tmp_path / strategy / "embeddings.npz") for strategy in results}
    assert np.array_equal(written["fsdp"]["index"], np.arange(360))
    assert np.array_equal(written["fsdp"]["label"], written["ddp"]["label"])
    np.testing.assert_allclose(written["fsdp"]["feats"], written["ddp"]["feats"], rtol=1e-5, atol=1e-6)
