"""``ThrottledProgressBar``: Lightning's tqdm bar, reading the logged metrics at most every so many seconds."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
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
