"""Callbacks that signal their own process at a given step, for tests that run the CLI in a
subprocess (loaded by the CLI, so the signal comes at an exact step, not at a moment raced for)."""

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


class SignalsAtSteps(L.Callback):
    """Sends this process ``signals[step]`` (a name such as ``"SIGUSR1"``) after optimizer step ``step``."""

    def __init__(self, signals: dict[int, str]) -> None:
        self.signals = {int(step): getattr(signal, name) for step, name in signals.items()}

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step in self.signals:
            os.kill(os.getpid(), self.signals.pop(trainer.global_step))
