"""AtomicCheckpointIO: a checkpoint is either complete under its name or not there at all."""

import os
from pathlib import Path

import lightning as L
import pytest
import torch

from ssl_lightning.callbacks import SaveOnInterrupt
from ssl_lightning.checkpoint_io import AtomicCheckpointIO
from ssl_lightning.datamodules import Digits
from ssl_lightning.methods import SimCLR
from ssl_lightning.runs import step_checkpoint

from helpers.fakes import TINY_BACKBONE


def test_save_goes_through_a_temporary_file_in_the_same_directory(tmp_path, monkeypatch):
    moves = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (moves.append((Path(src), Path(dst))), real_replace(src, dst)))
    target = tmp_path / "sub" / "a.ckpt"
    AtomicCheckpointIO().save_checkpoint({"x": torch.ones(3)}, target)
    (src, dst), = moves
    assert dst == target and src.parent == target.parent and src.name == f"a.ckpt.tmp-{os.getpid()}"
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.ckpt"]
    assert torch.equal(torch.load(target, weights_only=True)["x"], torch.ones(3))


def test_a_write_that_dies_leaves_the_old_checkpoint_and_no_temporary_file(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, target)

    def dies_half_way(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"step": 2}, target)
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert io.load_checkpoint(target) == {"step": 1}


def test_load_defaults_to_weights_only(tmp_path):
    path = tmp_path / "pickled.ckpt"
    torch.save({"obj": Path("not/a/tensor")}, path)  # an arbitrary class: refused by weights_only
    with pytest.raises(Exception, match="weights_only"):
        AtomicCheckpointIO().load_checkpoint(path)
    assert AtomicCheckpointIO().load_checkpoint(path, weights_only=False)["obj"] == Path("not/a/tensor")


def test_trainer_checkpoints_load_with_weights_only(tmp_path):
    model = SimCLR(**TINY_BACKBONE, proj_hidden_dim=32, proj_dim=16, optimizer="adamw", lr=1e-3)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=2, limit_val_batches=0, logger=False, enable_progress_bar=False,
        enable_model_summary=False, plugins=[AtomicCheckpointIO()],
        callbacks=[step_checkpoint(tmp_path, every_n_train_steps=1), SaveOnInterrupt()],
    )
    trainer.fit(model, Digits(batch_size=32, num_workers=0))
    files = sorted((tmp_path / "checkpoints").iterdir())
    assert [p.name for p in files] == ["last.ckpt", "step=1.ckpt", "step=2.ckpt"]
    for path in files:
        checkpoint = torch.load(path, weights_only=True)
        assert {"state_dict", "loops", "optimizer_states", "callbacks"} <= set(checkpoint)
    restored = SimCLR.load_from_checkpoint(files[0], weights_only=True)
    assert restored.hparams.on_nonfinite_loss == "raise"
