"""ImagesPerSecond and InputWait: throughput and the wait for data between logger writes, no device sync."""

import csv

import lightning as L
import pytest

from ssl_lightning.callbacks import ImagesPerSecond, InputWait, throughput
from ssl_lightning.datamodules import Digits, sampling
from ssl_lightning.methods import SimCLR

from helpers.fakes import TINY_BACKBONE, fake_loader


def logged_rows(logger, metric: str) -> list[dict]:
    with open(f"{logger.log_dir}/metrics.csv") as file:
        return [row for row in csv.DictReader(file) if row.get(metric)]


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
    return logged_rows(logger, "train/images_per_second")


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


class SlowSteps(L.Callback):
    """Training steps that take `seconds` by the ticking clock."""

    def __init__(self, clock: Ticks, seconds: float):
        self.clock, self.seconds = clock, seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.clock.now += self.seconds


def fit_timing_input_waits(tmp_path, monkeypatch, step_seconds: float, **data_kwargs) -> list[dict]:
    # The loader's clock and the callback's are the same ticking clock: each wait for a batch reads it
    # twice (one second waited), each batch start once.
    clock = Ticks()
    monkeypatch.setattr(throughput, "perf_counter", clock)
    monkeypatch.setattr(sampling, "perf_counter", clock)
    model = SimCLR(**TINY_BACKBONE, proj_hidden_dim=32, proj_dim=16, optimizer="adamw", lr=1e-3)
    logger = L.pytorch.loggers.CSVLogger(tmp_path)
    trainer = L.Trainer(accelerator="cpu", logger=logger, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[InputWait(), SlowSteps(clock, step_seconds)],
                        max_epochs=1, limit_train_batches=24, limit_val_batches=0, log_every_n_steps=12)
    trainer.fit(model, Digits(batch_size=8, num_workers=0, **data_kwargs))
    return logged_rows(logger, "train/input_wait_fraction")


def test_input_bound_training_logs_its_wait_and_warns_with_what_to_change(tmp_path, monkeypatch):
    # A step takes no time of its own: per step one second waited of three (two reads of the wait, one
    # batch start). Windows: steps 0-10, written at step 11's start, and steps 11-22, at step 23's.
    with pytest.warns(UserWarning, match=r"waited for the next batch 33% of the time over the last 11 batches") as caught:
        rows = fit_timing_input_waits(tmp_path, monkeypatch, step_seconds=0.0)
    advice = [str(w.message) for w in caught if "waited for the next batch" in str(w.message)]
    assert len(advice) == 1 and "raise data.num_workers (now 0), or keep a small dataset on the device" in advice[0]
    assert [row["step"] for row in rows] == ["11", "23"]
    assert all(float(row["train/input_wait_fraction"]) == pytest.approx(1 / 3) for row in rows)


def test_model_bound_training_logs_a_small_wait_and_does_not_warn(tmp_path, monkeypatch, recwarn):
    rows = fit_timing_input_waits(tmp_path, monkeypatch, step_seconds=100.0, view_device="cpu")
    assert [row["step"] for row in rows] == ["11", "23"]
    assert all(float(row["train/input_wait_fraction"]) == pytest.approx(1 / 103) for row in rows)
    assert not [w for w in recwarn if "waited for the next batch" in str(w.message)]


def test_per_image_views_are_advised_more_workers_or_device_views():
    assert "draw them batched on the device" in throughput._input_advice(Digits(view_device="cpu", num_workers=3))
