"""Digits: scikit-learn's embedded 8x8 handwritten digits, the default data (no download, seconds to train)."""

from __future__ import annotations

from functools import cached_property

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from ssl_lightning.datamodules.base import Split, ViewDataModule
from ssl_lightning.datamodules.sources import (
    ChannelStatsFromData,
    TensorImages,
    channel_stats,
)

STORED_SIZE = 32  # 8x8 is too small for strided backbones and random crops; upsampled once, not per view
ORIGIN = "scikit-learn's load_digits"


def load_digit_splits() -> dict[str, TensorImages]:
    """The 1,797 digits as uint8 1x32x32 images, split 80/20 stratified with random_state=0."""
    digits = load_digits()
    images = torch.from_numpy(digits.images).mul(255.0 / 16.0).round_().to(torch.uint8)
    images = F.resize(
        images.unsqueeze(1), [STORED_SIZE, STORED_SIZE], interpolation=InterpolationMode.BILINEAR, antialias=True
    )
    labels = torch.from_numpy(digits.target).long()
    train_idx, val_idx = train_test_split(
        torch.arange(len(labels)).numpy(), test_size=0.2, stratify=labels.numpy(), random_state=0
    )
    return {
        "train": TensorImages(images[train_idx], labels[train_idx], origin=ORIGIN),
        "val": TensorImages(images[val_idx], labels[val_idx], origin=ORIGIN),
    }


class Digits(ChannelStatsFromData, ViewDataModule):
    """scikit-learn's `load_digits` (UCI optical digits): 10 classes, 1,437 train / 360 validation
    images, grayscale 0..16 values scaled to uint8 and upsampled once to 32x32 (bilinear).
    mean/std are computed from the training split."""

    @cached_property
    def _splits(self) -> dict[str, TensorImages]:
        return load_digit_splits()

    def _estimate_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return channel_stats(self._splits["train"].images.split(512))

    @property
    def num_classes(self) -> int:
        return 10

    @property
    def in_chans(self) -> int:
        return 1

    @property
    def native_image_size(self) -> int:
        return STORED_SIZE

    def _load_images(self, split: Split) -> TensorImages:
        return self._splits["val" if split == "val" else "train"]
