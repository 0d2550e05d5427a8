"""``ImagesPerSecond``: training throughput in the logs, measured without waiting for the GPU."""

from __future__ import annotations

from time import perf_counter

import lightning as L

from ssl_lightning.methods.optimization import logger_writes_this_step


class ImagesPerSecond(L.Callback):
    """Logs ``train/images_per_second`` on the steps the logger writes: the images of all processes
    (each image once, however many views it makes) per second of wall time since the last write.

    Timing single steps on a GPU means waiting for each one (``torch.cuda.synchronize``, as
    Lightning's ``ThroughputMonitor`` does), which would stall the queue this project keeps full
    (docs/scale.md, "Host syncs"). Here the clock is read only at the start of the steps the logger
    writes, the same point of the loop each time, so the GPU's lag behind the host is about the
    same at both ends of a window and the rate over the window is the device's. A window never
    spans validation or an epoch boundary: it starts again at each training epoch and after each
    validation. The CLI adds this callback to every run.
    """

    def __init__(self) -> None:
        self._restart()
        self._logged_step = -1

    def _restart(self, now: float | None = None) -> None:
        self._start, self._images = now, 0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restart()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restart()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        now = perf_counter()
        # Under gradient accumulation every micro-batch of a logger step is asked: write once.
        writes = logger_writes_this_step(trainer) and trainer.global_step != self._logged_step
        if writes and self._start is not None and self._images and now > self._start:
            pl_module.log("train/images_per_second", self._images / (now - self._start), batch_size=1)
            self._logged_step = trainer.global_step
            self._restart(now)
        elif self._start is None:
            self._start = now
        # Every batch carries "index" (the batch contract); each process has its own batch.
        self._images += len(batch["index"]) * trainer.world_size
