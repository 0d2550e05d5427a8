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


def gpu_trainer(**kwargs) -> L.Trainer:
    return L.Trainer(accelerator="gpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, **kwargs)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_bf16_mixed_channels_last_fit_on_gpu(name):
    model = small_method(name, channels_last=True)
    trainer = gpu_trainer(max_steps=3, precision="bf16-mixed")
    trainer.fit(model, fake_loader(size=16))
    loss = trainer.callback_metrics["train/loss"]
    assert torch.isfinite(loss)
    assert next(model.backbone.parameters()).is_cuda
    assert model.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)


def test_sync_batchnorm_converts_and_trains_on_gpu():
    model = small_method("BYOL")
    trainer = gpu_trainer(max_steps=2, strategy="ddp", sync_batchnorm=True)
    trainer.fit(model, fake_loader(size=16))
    norms = [m for m in model.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(isinstance(m, nn.SyncBatchNorm) for m in norms)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
