"""``SaveOnInterrupt``: a checkpoint before the process exits on SIGTERM or Ctrl-C."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

INTERRUPT_CHECKPOINT = "interrupted.ckpt"


class SaveOnInterrupt(L.Callback):
    """Saves ``interrupted.ckpt`` beside the run's other checkpoints when training is stopped.

    * SIGTERM (a scheduler's preemption, ``kill``): Lightning's own handler sets
      ``trainer.received_sigterm``; at the end of the current batch this callback saves (the
      state is between two optimizer steps, so consistent) and Lightning then exits. The
      decision is reduced over ranks, so every rank takes part in the save.
    * Ctrl-C (KeyboardInterrupt): saved from ``on_exception``, i.e. wherever the interrupt
      landed; if that was inside an optimizer step the weights may be part-updated, which is
      why this file gets its own name and never replaces ``last.ckpt``.

    Other exceptions (a crash, a non-finite loss) save nothing: the last good checkpoint stays
    the newest one. A rerun of the same ``run_name`` resumes from the newest loadable file.

    Args:
        dirpath: where to write; default: the ModelCheckpoint's directory, else
            ``<default_root_dir>/checkpoints``.
    """

    def __init__(self, dirpath: str | Path | None = None) -> None:
        self.dirpath = dirpath
        self._saved_step: int | None = None  # a SIGTERM both saves at batch end and raises: save once

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if trainer.strategy.reduce_boolean_decision(trainer.received_sigterm, all=False):
            self._save(trainer, "SIGTERM")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if trainer.state.fn != TrainerFn.FITTING:  # validate / test / predict change no state worth saving
            return
        if isinstance(exception, KeyboardInterrupt):
            self._save(trainer, "KeyboardInterrupt")
        elif isinstance(exception, SIGTERMException) and not self._saved_at(trainer):
            # SIGTERM during validation or between batches: no batch end came to save at.
            self._save(trainer, "SIGTERM")

    def _save(self, trainer: L.Trainer, reason: str) -> None:
        if self._saved_at(trainer):
            return
        path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        self._saved_step = trainer.global_step
        rank_zero_info(f"{reason}: saved {path} at step {trainer.global_step}; rerun the same command to resume.")

    def _saved_at(self, trainer: L.Trainer) -> bool:
        return self._saved_step == trainer.global_step

    def checkpoint_path(self, trainer: L.Trainer) -> Path:
        if self.dirpath is not None:
            return Path(self.dirpath) / INTERRUPT_CHECKPOINT
        callback = trainer.checkpoint_callback
        if callback is not None and getattr(callback, "dirpath", None):
            return Path(callback.dirpath) / INTERRUPT_CHECKPOINT
        return Path(trainer.default_root_dir) / "checkpoints" / INTERRUPT_CHECKPOINT
