"""Tiny deterministic data and model settings shared by the method tests."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

TINY_BACKBONE = {
    "backbone": "resnet18",
    "backbone_kwargs": {"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64]},
    "cifar_stem": True,
}


class FakeViews(Dataset):
    """Random two-view samples in the batch-dict format, the same for every epoch."""

    def __init__(self, length: int = 32, num_views: int = 2, in_chans: int = 1, size: int = 16, num_classes: int = 4):
        self.length, self.num_views, self.in_chans, self.size, self.num_classes = (
            length, num_views, in_chans, size, num_classes,
        )

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.length:
            raise IndexError(i)  # also ends plain iteration over the dataset
        g = torch.Generator().manual_seed(i)
        views = [torch.randn(self.in_chans, self.size, self.size, generator=g) for _ in range(self.num_views)]
        return {"views": views, "label": i % self.num_classes, "index": i}


def fake_loader(batch_size: int = 8, **kwargs) -> DataLoader:
    return DataLoader(FakeViews(**kwargs), batch_size=batch_size)
