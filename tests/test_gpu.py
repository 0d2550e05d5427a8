"""CUDA-only checks: mixed precision, channels-last and SyncBatchNorm on a real GPU."""

import lightning as L
import pytest
import torch
from torch import nn

from fakes import TINY_BACKBONE, fake_loader
from ssl_lightning.methods import METHODS

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

SMALL_HEADS = {"proj_hidden_dim": 32, "proj_dim": 16}


def small_method(name: str, **kwargs):
    extra = {"pred_hidden_dim": 32} if name == "BYOL" else {}
    return METHODS[name](**TINY_BACKBONE, **SMALL_HEADS, **extra, in_chans=1, num_classes=4, batch_size=8, **kwargs)


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


@pytest.mark.parametrize("name", sorted(METHODS))
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
