"""The weight-decay schedule of the shared optimizer path (``weight_decay_end``, DINO's cosine 0.04 -> 0.4):
the pure formula against DINO's ``cosine_scheduler``; in a fit, the ``weights`` group follows it per
optimizer step (not per micro-batch) while ``no_decay`` and ``probe`` stay at 0, it is logged as
``wd/weights``, None keeps today's constant decay, and a resumed fit continues it exactly."""

import csv
import math
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from ssl_lightning.core.optimization import OptimizationConfig, configure_optimization
from ssl_lightning.optim import cosine_weight_decay

from helpers.fakes import fake_loader, quick_trainer, tiny_method

START, END = 0.04, 0.4


def dino_cosine_scheduler(base_value, final_value, total_steps):
    """facebookresearch/dino ``utils.cosine_scheduler`` without warm-up: one value per iteration."""
    iters = np.arange(total_steps)
    return final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))


def test_cosine_weight_decay_is_dinos_cosine_scheduler():
    expected = dino_cosine_scheduler(START, END, 20)
    for step in range(20):
        assert cosine_weight_decay(step, 20, START, END) == pytest.approx(expected[step], rel=1e-12)
    assert cosine_weight_decay(0, 20, START, END) == pytest.approx(START)
    assert cosine_weight_decay(10, 20, START, END) == pytest.approx((START + END) / 2)
    assert cosine_weight_decay(20, 20, START, END) == pytest.approx(END)
    assert cosine_weight_decay(35, 20, START, END) == pytest.approx(END)  # stays at the end value
    with pytest.raises(ValueError, match="total_steps must be positive, got 0"):
        cosine_weight_decay(0, 0, START, END)


class WeightDecaySeen(L.Callback):
    """Each optimizer step's weight decay per parameter group, as the optimizer is about to use it."""

    def __init__(self):
        self.per_step: dict[int, dict[str, float]] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.per_step[trainer.global_step] = {group["name"]: group["weight_decay"] for group in optimizer.param_groups}


def simclr(**kwargs):
    return tiny_method("SimCLR", in_chans=1, num_classes=4, batch_size=8, optimizer="adamw", lr=1e-3,
                       weight_decay=START, **kwargs)


def test_the_weights_group_follows_the_schedule_and_the_others_stay_undecayed(tmp_path):
    seen = WeightDecaySeen()
    logger = L.pytorch.loggers.CSVLogger(tmp_path)
    trainer = quick_trainer(max_steps=6, limit_val_batches=0, log_every_n_steps=3, logger=logger, callbacks=[seen])
    trainer.fit(simclr(weight_decay_end=END), fake_loader(batch_size=8, length=64))

    assert sorted(seen.per_step) == list(range(6))
    for step, decays in seen.per_step.items():
        assert decays["weights"] == pytest.approx(END + (START - END) * (1 + math.cos(math.pi * step / 6)) / 2)
        assert decays["no_decay"] == 0.0 and decays["probe"] == 0.0
    rows = [row for row in csv.DictReader(open(f"{logger.log_dir}/metrics.csv")) if row.get("wd/weights")]
    assert [int(row["step"]) for row in rows] == [2, 5]
    for row in rows:
        assert float(row["wd/weights"]) == pytest.approx(seen.per_step[int(row["step"])]["weights"])


def test_without_weight_decay_end_the_decay_stays_constant_and_is_not_logged(tmp_path):
    seen = WeightDecaySeen()
    logger = L.pytorch.loggers.CSVLogger(tmp_path)
    trainer = quick_trainer(max_steps=4, limit_val_batches=0, log_every_n_steps=2, logger=logger, callbacks=[seen])
    trainer.fit(simclr(), fake_loader(batch_size=8, length=64))
    assert [decays["weights"] for decays in seen.per_step.values()] == [START] * 4
    assert "wd/weights" not in open(f"{logger.log_dir}/metrics.csv").readline()


def test_the_schedule_moves_once_per_optimizer_step_under_gradient_accumulation():
    seen = WeightDecaySeen()
    trainer = quick_trainer(max_steps=3, limit_val_batches=0, accumulate_grad_batches=2, callbacks=[seen])
    trainer.fit(simclr(weight_decay_end=END), fake_loader(batch_size=8, length=64))
    assert trainer.estimated_stepping_batches == 3
    assert [decays["weights"] for decays in seen.per_step.values()] == pytest.approx(
        [cosine_weight_decay(step, 3, START, END) for step in range(3)])


def test_a_resumed_fit_continues_the_schedule_exactly(tmp_path):
    uninterrupted = WeightDecaySeen()
    checkpoints = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=3, save_top_k=-1)
    quick_trainer(max_steps=6, limit_val_batches=0, callbacks=[uninterrupted, checkpoints],
                  enable_checkpointing=True).fit(simclr(weight_decay_end=END), fake_loader(batch_size=8, length=64))

    resumed = WeightDecaySeen()
    quick_trainer(max_steps=6, limit_val_batches=0, callbacks=[resumed]).fit(
        simclr(weight_decay_end=END), fake_loader(batch_size=8, length=64), ckpt_path=tmp_path / "step=3.ckpt",
        weights_only=True)
    assert sorted(resumed.per_step) == [3, 4, 5]
    for step in (3, 4, 5):
        assert resumed.per_step[step] == uninterrupted.per_step[step]


def test_a_schedule_without_a_weights_group_is_refused():
    groups = [{"name": "no_decay", "params": [torch.nn.Parameter(torch.zeros(2))], "weight_decay": 0.0}]
    trainer = SimpleNamespace(world_size=1, accumulate_grad_batches=1)
    config = OptimizationConfig(optimizer="adamw", lr=1e-3, weight_decay=START, weight_decay_end=END)
    with pytest.raises(ValueError, match=r"weight_decay_end schedules .*'weights'.*groups are \['no_decay'\]"):
        configure_optimization(config, groups, trainer, batch_size=8)
