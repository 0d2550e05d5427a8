"""Tiny source models and corruption streams for the test-time adaptation tests."""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

NUM_CLASSES, SIZE = 3, 16
#: two corruptions that change images a lot at severity 5, cheap to generate on 16-px images
DOMAINS = ["gaussian_noise", "fog"]


def tiny_source(norm: str = "batch", num_classes: int = NUM_CLASSES, seed: int = 0) -> nn.Module:
    """A seeded convolutional classifier (images -> logits) with ``backbone`` and ``head`` as our
    checkpoints load: a conv, a normalisation layer (``batch``: BatchNorm with non-trivial running
    statistics; ``group``: GroupNorm; ``layer``: LayerNorm on the pooled features; ``none``), a ReLU, pooling,
    dropout (off in eval), and a linear classifier."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        layers: list[nn.Module] = [nn.Conv2d(3, 8, 3, padding=1)]
        if norm == "batch":
            layers.append(nn.BatchNorm2d(8))
        elif norm == "group":
            layers.append(nn.GroupNorm(2, 8))
        layers += [nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        if norm == "layer":
            layers.append(nn.LayerNorm(8))
        layers.append(nn.Dropout(0.5))
        backbone = nn.Sequential(*layers)
        model = nn.Sequential()
        model.add_module("backbone", backbone)
        model.add_module("head", nn.Linear(8, num_classes))
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):  # source statistics unlike any test batch's
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.data.uniform_(0.5, 1.5)
                module.bias.data.uniform_(-0.2, 0.2)
    return model


def plain_entropy_rows(logits):
    """The reference of the entropy-based TTA losses, row by row: H = -sum_c p_c log p_c, p = exp(l) / sum exp(l)."""
    rows = []
    for row in logits:
        p = torch.exp(row) / torch.exp(row).sum()
        rows.append(-sum(p[c] * torch.log(p[c]) for c in range(len(row))))
    return torch.stack(rows)


def write_stream_npz(path, count: int = 40, labelled: bool = True, train_count: int = 24):
    """An .npz with ``count`` 16-px RGB test images (labels i % 3, or -1) and a small training split."""
    rng = np.random.default_rng(0)
    labels = np.arange(count) % NUM_CLASSES if labelled else np.full(count, -1)
    np.savez(
        path,
        x_train=rng.integers(0, 256, (train_count, SIZE, SIZE, 3), dtype=np.uint8),
        y_train=np.arange(train_count) % NUM_CLASSES,
        x_test=rng.integers(0, 256, (count, SIZE, SIZE, 3), dtype=np.uint8),
        y_test=labels,
    )
    return path


def tiny_stream(tmp_path, labelled: bool = True, count: int = 40, **kwargs):
    """A CorruptionStream over an .npz written in ``tmp_path``: two domains, batches of 10, no workers."""
    from ssl_lightning.datamodules import NpzArrays
    from ssl_lightning.datamodules.corruption_stream import CorruptionStream

    path = write_stream_npz(tmp_path / f"stream-{count}-{labelled}.npz", count=count, labelled=labelled)
    kwargs = {"corruptions": DOMAINS, "batch_size": 10, "num_workers": 0, "cache_dir": str(tmp_path / "cache"),
              **kwargs}
    return CorruptionStream(NpzArrays(str(path), num_workers=0), **kwargs)


def tta_trainer(tmp_path, **kwargs):
    """A CPU Trainer for ``test`` with gradients allowed, writing its report into ``tmp_path / "run"``."""
    import lightning as L

    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                    inference_mode=False, default_root_dir=str(tmp_path / "run"))
    return L.Trainer(**{**defaults, **kwargs})


def run_tta(method, tmp_path, stream=None, callbacks=(), **trainer_kwargs):
    """``trainer.test(method, stream)``; returns (trainer, the logged metrics)."""
    trainer = tta_trainer(tmp_path, callbacks=list(callbacks), **trainer_kwargs)
    if stream is None:
        tmp_path.mkdir(parents=True, exist_ok=True)
        stream = tiny_stream(tmp_path)
    results = trainer.test(method, datamodule=stream, verbose=False)
    return trainer, results[0]


class RecordSteps:
    """A callback (built lazily: see conftest's note on Lightning) recording, for every test batch, the
    method's state dict before the step, the batch, and what ``test_step`` returned."""

    def __new__(cls):
        import lightning as L

        class _Record(L.Callback):
            def __init__(self):
                self.before, self.batches, self.outputs = [], [], []

            def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
                self.before.append(copy.deepcopy({k: v.detach().clone() for k, v in pl_module.state_dict().items()}))
                self.batches.append(batch)

            def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
                self.outputs.append({key: value.detach().clone() for key, value in outputs.items()})

        return _Record()
