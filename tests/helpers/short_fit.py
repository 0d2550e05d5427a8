"""One short fit per registered method, shared by the cross-cutting tests that only read what it
left behind: host syncs per step, bf16 dtypes, the checkpoint. One fit instead of one per test
keeps the per-method cost of the suite down as methods are added (tests/methods/conftest.py
caches it for the session).

The fit: 6 steps of bf16-mixed autocast on labelled fake data (so the online probe trains), the
progress bar on, the logger writing every 3 steps, LARS; then a checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch

from ssl_lightning.callbacks import ImagesPerSecond, ThrottledProgressBar

from helpers.fakes import fake_loader, tiny_method
from helpers.host_syncs import HostSyncCounter
from helpers.registry import first_head

LOG_EVERY = 3


class CountSyncsPerStep(L.Callback):
    """Opens the counter at the start of each training batch and closes it after every other
    callback's batch end (the progress bar's included): the whole step, data loading aside."""

    def __init__(self, counter: HostSyncCounter):
        self.counter, self.per_step = counter, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.counter.seen.clear()
        self.counter.counting = True

    def close(self, trainer):
        self.counter.counting = False
        self.per_step[trainer.global_step - 1] = dict(self.counter.seen)


class CloseCount(L.Callback):
    def __init__(self, opener: CountSyncsPerStep):
        self.opener = opener

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.opener.close(trainer)


class RecordDtypes(L.Callback):
    """The first head's output dtype (did autocast run?) and the returned loss's dtype, per step."""

    def on_train_start(self, trainer, pl_module):
        self.head_dtypes, self.loss_dtypes = [], []
        self._hook = first_head(pl_module).register_forward_hook(
            lambda module, args, out: self.head_dtypes.append(out.dtype))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.loss_dtypes.append(outputs["loss"].dtype)

    def on_train_end(self, trainer, pl_module):
        self._hook.remove()  # the shared model is called again by other tests, outside autocast


def syncs_per_step(model: L.LightningModule, directory: Path, labelled: bool = True, precision: str = "32-true",
                   extra_callbacks: tuple = ()) -> tuple[L.Trainer, dict[int, dict]]:
    """Syncing operations of each step of a 6-step fit on fake 16 px data, labelled (so the online
    probe trains) or unlabelled (-1), with the bar on and the logger writing every LOG_EVERY steps."""
    counter = HostSyncCounter()
    opener = CountSyncsPerStep(counter)
    trainer = L.Trainer(
        accelerator="cpu", precision=precision, max_steps=2 * LOG_EVERY, log_every_n_steps=LOG_EVERY,
        enable_checkpointing=False, enable_model_summary=False, logger=L.pytorch.loggers.CSVLogger(directory),
        limit_val_batches=0,
        callbacks=[opener, *extra_callbacks, ImagesPerSecond(), ThrottledProgressBar(metrics_every_s=3600),
                   CloseCount(opener)],
    )
    loader = fake_loader(batch_size=8, length=64, size=16, num_classes=4)
    if not labelled:
        loader = torch.utils.data.DataLoader([{**row, "label": -1} for row in loader.dataset], batch_size=8)
    with counter:
        trainer.fit(model, loader)
    assert len(opener.per_step) == 2 * LOG_EVERY
    return trainer, opener.per_step


@dataclass
class ShortFit:
    model: L.LightningModule
    syncs_per_step: dict[int, dict]
    head_dtypes: list[torch.dtype]
    loss_dtypes: list[torch.dtype]
    final_loss: torch.Tensor
    checkpoint: Path


def run_short_fit(name: str, directory: Path) -> ShortFit:
    model = tiny_method(name, in_chans=1, num_classes=4, batch_size=8, optimizer="lars", lr=0.3)
    dtypes = RecordDtypes()
    trainer, per_step = syncs_per_step(model, directory, precision="bf16-mixed", extra_callbacks=(dtypes,))
    checkpoint = directory / "method.ckpt"
    trainer.save_checkpoint(checkpoint)
    return ShortFit(model, per_step, dtypes.head_dtypes, dtypes.loss_dtypes,
                    trainer.callback_metrics["train/loss"], checkpoint)
