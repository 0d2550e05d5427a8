"""Training throughput in the logs, measured without waiting for the GPU: ``ImagesPerSecond``, and
``InputWait``, the share of the training time spent waiting for the next batch."""

from __future__ import annotations

from time import perf_counter

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn

from ssl_lightning.core.step_logging import logger_writes_this_step


class LoggerStepWindows(L.Callback):
    """Host-clock windows of training steps, each closed (and its value logged) at the start of a
    step the logger writes.

    Timing single steps on a GPU means waiting for each one (``torch.cuda.synchronize``, as
    Lightning's ``ThroughputMonitor`` does), which would stall the queue this project keeps full
    (docs/scale.md, "Host syncs"). Here the clock is read only at the start of steps, the same point
    of the loop each time, so the GPU's lag behind the host is about the same at both ends of a
    window and a rate over the window is the device's. A window never spans validation or an epoch
    boundary: it starts again at each training epoch and after each validation. Subclasses say what
    a window counts (``_open``, ``_count``) and what it logs (``_close``).
    """

    def __init__(self) -> None:
        self._start: float | None = None
        self._logged_step = -1

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        now = perf_counter()
        # Under gradient accumulation every micro-batch of a logger step is asked: write once.
        writes = logger_writes_this_step(trainer) and trainer.global_step != self._logged_step
        if self._start is not None and writes and now > self._start and self._close(trainer, pl_module, now - self._start):
            self._logged_step = trainer.global_step
            self._start = None
        if self._start is None:
            self._start = now
            self._open(trainer)
        self._count(trainer, batch)

    def _open(self, trainer: L.Trainer) -> None:
        """A window starts at this batch."""

    def _count(self, trainer: L.Trainer, batch) -> None:
        """A batch of the open window starts."""

    def _close(self, trainer: L.Trainer, pl_module: L.LightningModule, seconds: float) -> bool:
        """The window ends after `seconds`: log its value; False if it has nothing to say (it stays open)."""
        raise NotImplementedError


class ImagesPerSecond(LoggerStepWindows):
    """Logs ``train/images_per_second`` on the steps the logger writes: the images of all processes
    (each image once, however many views it makes) per second of wall time since the last write.
    The CLI adds this callback to every run."""

    def _open(self, trainer: L.Trainer) -> None:
        self._images = 0

    def _count(self, trainer: L.Trainer, batch) -> None:
        # Every batch carries "index" (the batch contract); each process has its own batch.
        self._images += len(batch["index"]) * trainer.world_size

    def _close(self, trainer: L.Trainer, pl_module: L.LightningModule, seconds: float) -> bool:
        pl_module.log("train/images_per_second", self._images / seconds, batch_size=1)
        return True


#: the share of the training time spent waiting for batches above which the input pipeline, not
#: the model, sets the pace: the warning's threshold
INPUT_BOUND_FRACTION = 0.25
#: windows shorter than this are not judged (the first batches of an epoch come from a full queue)
MIN_JUDGED_BATCHES = 10


class InputWait(LoggerStepWindows):
    """Logs ``train/input_wait_fraction`` on the steps the logger writes: the share of this process's
    wall time since the last write that the training loop spent waiting for the next batch from the
    DataLoader (with workers, the wait for them; without, the loading itself). Warns once when a
    window of at least ``MIN_JUDGED_BATCHES`` batches waited ``INPUT_BOUND_FRACTION`` or more, with what
    to change. Needs a ssl_lightning DataModule (its loader times the waits); with other data it
    logs nothing. The CLI adds this callback to every run.
    """

    def __init__(self) -> None:
        super().__init__()
        self._warned = False

    def _open(self, trainer: L.Trainer) -> None:
        self._batches, self._waited_before = 0, _train_wait_seconds(trainer)

    def _count(self, trainer: L.Trainer, batch) -> None:
        self._batches += 1

    def _close(self, trainer: L.Trainer, pl_module: L.LightningModule, seconds: float) -> bool:
        waited_now = _train_wait_seconds(trainer)
        if waited_now is None or self._waited_before is None or waited_now < self._waited_before:
            return False  # not our loader, or a new one since the window opened: nothing comparable
        fraction = (waited_now - self._waited_before) / seconds
        pl_module.log("train/input_wait_fraction", fraction, batch_size=1)
        if fraction >= INPUT_BOUND_FRACTION and self._batches >= MIN_JUDGED_BATCHES and not self._warned:
            self._warned = True
            rank_zero_warn(
                f"The training loop waited for the next batch {fraction:.0%} of the time over the last "
                f"{self._batches} batches (train/input_wait_fraction): the input pipeline, not the model, sets "
                f"the pace. {_input_advice(trainer.datamodule)}"
            )
        return True


def _train_wait_seconds(trainer: L.Trainer) -> float | None:
    return getattr(getattr(trainer, "datamodule", None), "train_wait_seconds", None)


def _input_advice(datamodule) -> str:
    workers = f"data.num_workers (now {datamodule.num_workers})"
    if not datamodule.views_on_device:
        return (f"Views are made per image in the DataLoader workers: raise {workers}, or draw them batched on "
                "the device (data.view_device: device; docs/device_views.md).")
    if datamodule.in_memory:
        return "The loader only hands out indices (data.in_memory): the training process is busy elsewhere."
    return (f"Views are drawn on the device; the workers decode and resize images: raise {workers}, or keep a "
            "small dataset on the device (data.in_memory: true; docs/device_views.md).")
