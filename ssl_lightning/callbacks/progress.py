"""Progress output: ``ThrottledProgressBar`` (Lightning's tqdm bar, reading the logged metrics at most every
so many seconds) for terminals, ``ProgressLines`` (one line per epoch or per interval) for logs."""

from __future__ import annotations

import datetime
import sys
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.progress_bar import get_standard_metrics


class ThrottledProgressBar(TQDMProgressBar):
    """Lightning's ``TQDMProgressBar`` that reads the metrics it shows (``train/loss``) at most every
    ``metrics_every_s`` seconds during training; the step count still moves every ``refresh_rate`` steps.

    Showing a metric held on a GPU copies it to the host, which waits until the GPU has finished
    all the work queued so far. Lightning's bar does that after every step, so the Python side of
    the next step (fetching the batch, launching its kernels) can never run ahead while the GPU
    computes, and fast steps pay that time on top. At the default of 0.5 s a 20-step-per-second
    run waits once every 10 steps. The CLI uses this bar unless ``trainer.callbacks`` holds another
    progress bar; in Python pass ``Trainer(callbacks=[ThrottledProgressBar()])``.

    Args:
        refresh_rate, process_position, leave: as Lightning's ``TQDMProgressBar``.
        metrics_every_s: least time between two reads of the metrics; 0 reads them at every refresh.
    """

    def __init__(self, refresh_rate: int = 1, process_position: int = 0, leave: bool = False,
                 metrics_every_s: float = 0.5) -> None:
        super().__init__(refresh_rate=refresh_rate, process_position=process_position, leave=leave)
        if metrics_every_s < 0:
            raise ValueError(f"metrics_every_s must be >= 0 seconds, got {metrics_every_s}")
        self.metrics_every_s = metrics_every_s
        self._shown: dict[str, Any] = {}
        self._read_at = -float("inf")
        self._in_train_batch_end = False

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        if self._in_train_batch_end and time.monotonic() - self._read_at < self.metrics_every_s:
            return self._shown
        self._shown, self._read_at = super().get_metrics(trainer, pl_module), time.monotonic()
        return self._shown

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        # The first steps too wait for the interval; until then the bar shows no logged value.
        self._shown, self._read_at = get_standard_metrics(trainer), time.monotonic()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        # Only here are reads throttled: at the end of an epoch or of validation the bar shows the latest values.
        self._in_train_batch_end = True
        try:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        finally:
            self._in_train_batch_end = False


class ProgressLines(ProgressBar):
    """Progress for logs that are not a terminal (a SLURM log, CI, ``> log.txt``): whole lines instead
    of a bar that redraws itself, one at the end of every training epoch (after its validation) and,
    within an epoch, one at most every ``every_s`` seconds. A line holds the epoch, the step, the
    elapsed time and the progress-bar metrics (``train/loss``, ``val/...``). Written by rank zero to
    standard error, where the bar would go. The CLI uses it instead of ``ThrottledProgressBar`` when
    standard error is not a terminal.

    Metrics are read (a host sync on a GPU) only when a line is written.

    Args:
        every_s: least seconds between two lines within an epoch; None: one line per epoch only.
    """

    def __init__(self, every_s: float | None = 60.0) -> None:
        super().__init__()
        if every_s is not None and every_s < 0:
            raise ValueError(f"every_s must be >= 0 seconds or None, got {every_s}")
        self.every_s = every_s
        self._enabled = True
        self._started = self._last_line = 0.0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = self._last_line = time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.every_s is not None and time.monotonic() - self._last_line >= self.every_s:
            self._write(trainer, pl_module, f"batch {batch_idx + 1}/{_count(self.total_train_batches)}")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, pl_module, "end")

    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule, where: str) -> None:
        self._last_line = time.monotonic()
        if not (self._enabled and trainer.is_global_zero):
            return
        epochs = f"/{trainer.max_epochs - 1}" if trainer.max_epochs not in (None, -1) else ""
        metrics = " ".join(f"{name}={_format(value)}" for name, value in self.get_metrics(trainer, pl_module).items()
                           if name != "v_num")
        elapsed = datetime.timedelta(seconds=round(self._last_line - self._started))
        sys.stderr.write(f"Epoch {trainer.current_epoch}{epochs} {where} | step {trainer.global_step} | {elapsed} | "
                         f"{metrics}\n")
        sys.stderr.flush()


def _count(batches: int | float) -> str:
    return "?" if batches == float("inf") else str(int(batches))


def _format(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
