"""A callback that signals its own process at given steps, for tests that run the CLI in a
subprocess (loaded by the CLI, so each signal comes at an exact step, not at a moment raced for)."""

import os
import signal

import lightning as L


class SignalsAtSteps(L.Callback):
    """Sends this process ``signals[step]`` (a name such as ``"SIGUSR1"``) after optimizer step
    ``step``. ``"SIGKILL"`` stands for the OOM killer or a lost node: no handler, no cleanup."""

    def __init__(self, signals: dict[int, str]) -> None:
        self.signals = {int(step): getattr(signal, name) for step, name in signals.items()}

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step in self.signals:
            os.kill(os.getpid(), self.signals.pop(trainer.global_step))
