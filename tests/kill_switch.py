"""A callback that kills its own process with SIGKILL, for the exact-resume test (loaded by the CLI)."""

import os
import signal

import lightning as L


class KillAtStep(L.Callback):
    """SIGKILL (no handler, no cleanup, as the OOM killer or a lost node) after optimizer step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
