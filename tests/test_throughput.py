"""ImagesPerSecond: images of all processes per second between logger writes, no device sync."""

import csv

import lightning as L
import pytest

from fakes import TINY_BACKBONE, fake_loader
from ssl_lightning.callbacks import ImagesPerSecond, throughput
from ssl_lightning.methods import SimCLR


class Ticks:
    """A clock that advances one second each time it is read."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        self.now += 1.0
        return self.now


class SlowValidation(L.Callback):
    """Validation that takes 100 seconds by the ticking clock."""

    def __init__(self, clock: Ticks):
        self.clock = clock

    def on_validation_start(self, trainer, pl_module):
        self.clock.now += 100.0


def fit_with_ticking_clock(tmp_path, monkeypatch, **trainer_kwargs) -> list[dict]:
    clock = Ticks()
    monkeypatch.setattr(throughput, "perf_counter", clock)
    model = SimCLR(**TINY_BACKBONE, proj_hidden_dim=32, proj_dim=16, in_chans=1, batch_size=8, optimizer="adamw", lr=1e-3)
    logger = L.pytorch.loggers.CSVLogger(tmp_path)
    trainer = L.Trainer(accelerator="cpu", logger=logger, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[ImagesPerSecond(), SlowValidation(clock)], num_sanity_val_steps=0, **trainer_kwargs)
    trainer.fit(model, fake_loader(batch_size=8, length=32), val_dataloaders=fake_loader(batch_size=8, length=16))
    return [row for row in csv.DictReader(open(f"{logger.log_dir}/metrics.csv")) if row.get("train/images_per_second")]


def test_logged_on_logger_steps_over_windows_that_skip_validation(tmp_path, monkeypatch):
    # 4 steps per epoch, a 100-second validation after every 2nd, the logger writing every 3rd
    # step. The clock is read once per batch start, so a window's seconds are its steps, 8 images
    # each, unless it spans a validation. Windows restart after validation and at each epoch, so
    # steps 2 and 8 (just after one) have nothing to write.
    rows = fit_with_ticking_clock(tmp_path, monkeypatch, max_epochs=3, log_every_n_steps=3, val_check_interval=2)
    assert [row["step"] for row in rows] == ["5", "11"]
    assert all(float(row["train/images_per_second"]) == pytest.approx(8.0) for row in rows)


def test_gradient_accumulation_writes_once_per_logger_step(tmp_path, monkeypatch):
    # Two micro-batches of 8 per optimizer step: 16 images per step, two clock reads per step.
    rows = fit_with_ticking_clock(tmp_path, monkeypatch, max_epochs=2, log_every_n_steps=1, accumulate_grad_batches=2,
                                  limit_val_batches=0)
    assert [row["step"] for row in rows] == ["0", "1", "2", "3"]  # one row per step
    assert all(float(row["train/images_per_second"]) == pytest.approx(8.0) for row in rows)
