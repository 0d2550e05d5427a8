"""CUDA-only checks: mixed precision, channels-last, SyncBatchNorm and host syncs on a real GPU."""

import warnings

import lightning as L
import pytest
import torch
from torch import nn

from ssl_lightning.callbacks import ImagesPerSecond, InputWait, ThrottledProgressBar
from ssl_lightning.datamodules import Digits
from ssl_lightning.datamodules.device_views import DeviceViews
from ssl_lightning.datamodules.views import resolve_views

from helpers.fakes import fake_loader, tiny_method
from helpers.registry import every_method, view_preset
from helpers.views import STD, assert_same_views

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

def small_method(name: str, **kwargs):
    return tiny_method(name, in_chans=1, num_classes=4, batch_size=8, **kwargs)


class InspectWhileTraining(L.Callback):
    """Lightning moves the model back to the CPU and reverts SyncBatchNorm after fit: look during it."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.device = pl_module.device
        self.conv1_channels_last = pl_module.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
        self.norms = [m for m in pl_module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def gpu_trainer(**kwargs) -> tuple[L.Trainer, InspectWhileTraining]:
    inspector = InspectWhileTraining()
    trainer = L.Trainer(accelerator="gpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[inspector], **kwargs)
    return trainer, inspector


@pytest.mark.parametrize("name", every_method())
def test_bf16_mixed_channels_last_fit_on_gpu(name):
    model = small_method(name, channels_last=True)
    trainer, seen = gpu_trainer(max_steps=3, precision="bf16-mixed")
    trainer.fit(model, fake_loader(size=16))
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert seen.device.type == "cuda" and seen.conv1_channels_last


def test_sync_batchnorm_converts_and_trains_on_gpu():
    model = small_method("BYOL")
    trainer, seen = gpu_trainer(max_steps=2, strategy="ddp", sync_batchnorm=True)
    trainer.fit(model, fake_loader(size=16))
    assert seen.norms and all(isinstance(m, nn.SyncBatchNorm) for m in seen.norms)  # teacher's too
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


class SyncWarningsPerStep(L.Callback):
    """CUDA's sync debug mode on for all of training. A step's window runs from its batch start to
    the next one: its forward, backward and optimizer step, its callbacks and logging, and the
    loading, transfer and device views of the next batch."""

    def __init__(self, caught: list):
        self.caught, self.per_step = caught, {}
        self._open: int | None = None
        self._taken = 0

    def on_train_start(self, trainer, pl_module):
        torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._close()
        self._open, self._taken = trainer.global_step, len(self.caught)

    def on_train_end(self, trainer, pl_module):
        self._close()
        torch.cuda.set_sync_debug_mode("default")

    def _close(self):
        if self._open is not None:
            self.per_step[self._open] = [str(w.message) for w in self.caught[self._taken:] if "synchroniz" in str(w.message)]


@pytest.mark.parametrize("name,compile_views", [(name, False) for name in every_method()] + [("SimCLR", True)])
def test_training_steps_between_logger_steps_never_wait_for_the_gpu(name, compile_views, tmp_path):
    model = tiny_method(name, channels_last=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        watch = SyncWarningsPerStep(caught)
        trainer = L.Trainer(
            accelerator="gpu", devices=1, max_steps=8, log_every_n_steps=4, precision="bf16-mixed",
            logger=L.pytorch.loggers.CSVLogger(tmp_path), enable_checkpointing=False, enable_model_summary=False,
            limit_val_batches=0,
            callbacks=[ThrottledProgressBar(metrics_every_s=3600), ImagesPerSecond(), InputWait(), watch],
        )
        # Device views from the in-memory uint8 dataset: the whole data path runs on the GPU.
        data = Digits(batch_size=32, num_workers=0, view_device="device", in_memory=True, compile_views=compile_views,
                      views=view_preset(name))
        trainer.fit(model, data)
    # Step 0 pays the start-up (moving the dataset, cuDNN's choices, compiling); steps 3 and 7 are logger steps.
    waits = {step: messages for step, messages in watch.per_step.items() if step not in (0, 3, 7) and messages}
    assert watch.per_step[3], "the logger step's reads are seen (else the debug mode caught nothing)"
    assert len(watch.per_step) == 8 and not waits, waits


def test_compiled_views_on_the_gpu_equal_the_eager_views():
    specs = resolve_views("byol", 32, 3)  # two specs; partial jitter, blur and solarize choices
    images = torch.randint(0, 256, (64, 3, 40, 40), dtype=torch.uint8, device="cuda")
    eager, compiled = (DeviceViews(specs, (0.5,) * 3, (STD,) * 3, compile=flag).cuda() for flag in (False, True))
    drawn = compiled(images, torch.Generator("cuda").manual_seed(0))
    assert_same_views(drawn, eager(images, torch.Generator("cuda").manual_seed(0)))
