"""What a NaN or infinite training loss does: stop the run, or skip the step, on every rank alike."""

from __future__ import annotations

from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from ssl_lightning.distributed import gather

NonFinitePolicy = Literal["raise", "skip"]


def loss_terms(out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``loss`` and the named ``loss/<term>`` entries of a ``shared_step`` output."""
    return {name: value for name, value in out.items() if name == "loss" or name.startswith("loss/")}


def describe(terms: dict[str, float]) -> str:
    return ", ".join(f"{name}={value:.6g}" for name, value in terms.items())


class NonFiniteGuard:
    """Watches every training loss for NaN/inf, under either policy.

    ``"raise"`` never waits for the accelerator on an ordinary step. Reading a GPU value on the host
    (``bool(torch.isfinite(loss))``) blocks until the GPU has finished everything queued, so the
    Python side of the next step, and the data it needs, can no longer be prepared while the GPU
    computes. Instead the first non-finite step, its epoch and its loss terms are recorded on the
    device (``observe``), and ``check`` reads the record where values are read anyway: on the steps
    the logger writes, before validation, before every checkpoint and at the end of training. The
    run then stops with an error naming the step where the loss went bad, so no checkpoint ever
    holds a state from after it.

    ``"skip"`` has to decide before the optimizer step, so it reads the loss on every step (one
    host sync, and one all-reduce under DDP, per step).
    """

    def __init__(self, policy: NonFinitePolicy, owner: str):
        if policy not in ("raise", "skip"):
            raise ValueError(f"on_nonfinite_loss must be 'raise' or 'skip', got {policy!r}")
        self.policy, self.owner = policy, owner
        self._names: list[str] | None = None
        self._step: torch.Tensor | None = None  # first non-finite step, -1 while none
        self._epoch: torch.Tensor | None = None
        self._values: torch.Tensor | None = None  # the loss terms at that step
        self._last_step = -1  # the last step observed

    def skips(self, out: dict[str, torch.Tensor], trainer: L.Trainer) -> bool:
        """Under ``"skip"``: whether any rank's loss is non-finite this step (every rank gets the same
        answer, so all skip together and none is left waiting in DDP's all-reduce)."""
        bad_here = not bool(torch.isfinite(out["loss"]))
        if not trainer.strategy.reduce_boolean_decision(bad_here, all=False):
            return False
        where = f"step {trainer.global_step} (epoch {trainer.current_epoch})"
        terms = {name: float(value.detach()) for name, value in loss_terms(out).items()}
        rank_zero_warn(f"{self.owner}: non-finite loss at {where} ({describe(terms)}); step skipped.")
        return True

    def observe(self, out: dict[str, torch.Tensor], trainer: L.Trainer) -> None:
        """Under ``"raise"``: remember the first non-finite step, on the device, without a host sync."""
        terms = loss_terms(out)
        loss = out["loss"]
        if self._names is None:
            self._names = list(terms)
            self._step = torch.full((), -1, dtype=torch.long, device=loss.device)
            self._epoch = torch.full((), -1, dtype=torch.long, device=loss.device)
            self._values = torch.zeros(len(terms), dtype=torch.float32, device=loss.device)
        elif list(terms) != self._names:
            raise RuntimeError(
                f"{self.owner}.shared_step returned the loss terms {list(terms)} after {self._names}; "
                "return the same terms on every step."
            )
        values = torch.stack(
            [torch.as_tensor(v, device=loss.device).detach().float().reshape(()) for v in terms.values()]
        )
        self._last_step = trainer.global_step
        first = ~torch.isfinite(loss.detach()) & (self._step < 0)
        # Python numbers go to the kernel as arguments: no host-to-device copy, no wait.
        self._step = torch.where(first, trainer.global_step, self._step)
        self._epoch = torch.where(first, trainer.current_epoch, self._epoch)
        self._values = torch.where(first, values, self._values)

    def check(self, trainer: L.Trainer) -> None:
        """Under ``"raise"``: stop if any rank has seen a non-finite loss. Every rank must call it at
        the same point (it gathers the records), except from an exception handler
        (``trainer.interrupted``), where each rank reads its own."""
        if self.policy != "raise" or self._step is None:
            return
        steps, epochs, values = self._step.reshape(1), self._epoch.reshape(1), self._values.reshape(1, -1)
        gathers = trainer.world_size > 1 and not trainer.interrupted
        if gathers:  # one row per rank, in rank order
            steps, epochs, values = gather(steps), gather(epochs), gather(values)
        seen = steps >= 0
        if not bool(seen.any()):
            return
        rank = int(torch.where(seen, steps, steps.max() + 1).argmin())
        step, epoch = int(steps[rank]), int(epochs[rank])
        terms = dict(zip(self._names, values[rank].tolist()))
        on_rank = f" on rank {rank if gathers else trainer.global_rank}" if trainer.world_size > 1 else ""
        noticed = (
            f"Noticed after step {self._last_step}: the loss is read when the logger writes, before validation and "
            "before checkpoints, so that the accelerator never waits for the host. "
            if self._last_step > step else ""
        )
        callback = trainer.checkpoint_callback
        kept = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")
        raise FloatingPointError(
            f"{self.owner}: non-finite loss at step {step} (epoch {epoch}){on_rank} ({describe(terms)}). "
            + noticed
            + (f"The last good checkpoint, {kept}, is kept. " if kept else "")
            + "Lower the learning rate or add warm-up, check the inputs for NaN, or set "
            "model.init_args.on_nonfinite_loss=skip to drop such steps."
        )
