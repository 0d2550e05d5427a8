"""NpzArrays: a whole dataset in one .npz file, held in memory (uint8 arrays or packed JPEG bytes)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from ssl_lightning.datamodules.base import Split, ViewDataModule
from ssl_lightning.datamodules.sources import (
    ChannelStatsFromData,
    JpegBytesImages,
    TensorImages,
    sampled_channel_stats,
)

ARRAY_KEYS = ("x_train", "y_train", "x_test", "y_test")
JPEG_KEYS = ("train_jpeg", "train_offsets", "train_labels", "test_jpeg", "test_offsets", "test_labels")
STATS_SAMPLE = 10_000  # images that estimate mean/std: enough for 3 decimals, fast to decode


@dataclass(frozen=True)
class NpzContents:
    train: TensorImages | JpegBytesImages
    test: TensorImages | JpegBytesImages
    num_classes: int | None
    in_chans: int
    image_size: int


def _require_keys(path: Path, files: list[str], expected: tuple[str, ...], layout: str) -> None:
    missing = [key for key in expected if key not in files]
    if missing:
        raise ValueError(
            f"{path} lacks keys {missing} of the {layout} layout, which expects {', '.join(expected)}; "
            f"the file has {files}"
        )


def _array_images(path: Path, images: np.ndarray, labels: np.ndarray, key: str) -> TensorImages:
    """uint8 NHWC (or NHW for grayscale) -> an NCHW view of the same memory."""
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] not in (1, 3)):
        raise ValueError(
            f"{path}: {key} must be uint8 NxHxWxC (C = 1 or 3) or NxHxW, got {images.dtype} {images.shape}"
        )
    tensor = torch.from_numpy(images)
    tensor = tensor.unsqueeze(1) if tensor.ndim == 3 else tensor.permute(0, 3, 1, 2)
    return TensorImages(tensor, torch.from_numpy(labels.astype(np.int64)), origin=str(path))


def _jpeg_images(path: Path, npz: np.lib.npyio.NpzFile) -> tuple[JpegBytesImages, JpegBytesImages]:
    """Packed JPEG bytes; the first train image tells the channel count that every image decodes to."""
    offsets = npz["train_offsets"]
    if len(offsets) < 2:
        raise ValueError(f"{path}: the train split is empty (train_offsets holds {len(offsets)} entries)")
    first = decode_jpeg(torch.from_numpy(npz["train_jpeg"][offsets[0] : offsets[1]]), mode=ImageReadMode.UNCHANGED)
    in_chans = first.shape[0]
    train, test = (
        JpegBytesImages(
            torch.from_numpy(npz[f"{split}_jpeg"]),
            torch.from_numpy(npz[f"{split}_offsets"]),
            torch.from_numpy(npz[f"{split}_labels"]),
            in_chans,
            origin=str(path),
        )
        for split in ("train", "test")
    )
    return train, test


def load_npz(path: Path) -> NpzContents:
    """Read either layout: x_train/y_train/x_test/y_test arrays, or <split>_jpeg/_offsets/_labels."""
    if not path.is_file():
        raise FileNotFoundError(
            f"npz file not found: {path}. NpzArrays reads a file you provide, written with numpy.savez("
            f"path, {', '.join(f'{k}=...' for k in ARRAY_KEYS)}) (uint8 NHWC/NHW images, integer labels) "
            f"or holding the packed-JPEG keys {', '.join(JPEG_KEYS)}."
        )
    with np.load(path) as npz:
        files = list(npz.files)
        if any(key.startswith("x_") for key in files):
            _require_keys(path, files, ARRAY_KEYS, "array")
            train = _array_images(path, npz["x_train"], npz["y_train"], "x_train")
            test = _array_images(path, npz["x_test"], npz["y_test"], "x_test")
        elif any(key.endswith("_jpeg") for key in files):
            _require_keys(path, files, JPEG_KEYS, "packed-JPEG")
            train, test = _jpeg_images(path, npz)
        else:
            raise ValueError(
                f"{path} matches neither npz layout: expected keys {', '.join(ARRAY_KEYS)} or "
                f"{', '.join(JPEG_KEYS)}; the file has {files}"
            )
        num_classes = len(npz["classes"]) if "classes" in files else None
    if len(train) == 0:
        raise ValueError(f"{path}: the train split is empty (0 images)")
    in_chans, height, width = train[0][0].shape
    if num_classes is None:
        top = int(torch.cat([train.labels, test.labels]).max())
        num_classes = top + 1 if top >= 0 else None
    return NpzContents(train, test, num_classes, in_chans, min(height, width))


class NpzArrays(ChannelStatsFromData, ViewDataModule):
    """A dataset held in one .npz file, loaded into memory on first use.

    Layouts: `x_train`, `y_train`, `x_test`, `y_test` (uint8 images NxHxWxC, or NxHxW for
    grayscale; integer labels, -1 = unlabelled), or packed JPEG files `<split>_jpeg` (all bytes
    concatenated), `<split>_offsets` (N+1 int64) and `<split>_labels` for split train and test,
    decoded per item with torchvision.io.decode_jpeg. Validation uses the test split. num_classes is
    len(`classes`) when the file has that key (a label beyond it is an error at setup), else the
    largest label + 1. in_chans and image_size come from the first training image. mean/std, unless
    given, are estimated from up to 10,000 evenly spaced training images.
    """

    def __init__(
        self,
        path: str,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self._keep_given_stats(mean, std)
        self.path = Path(path).expanduser()

    @cached_property
    def _contents(self) -> NpzContents:
        return load_npz(self.path)

    def _estimate_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return sampled_channel_stats(self._contents.train, STATS_SAMPLE)

    @property
    def num_classes(self) -> int | None:
        return self._contents.num_classes

    @property
    def in_chans(self) -> int:
        return self._contents.in_chans

    @property
    def native_image_size(self) -> int:
        return self._contents.image_size

    def _load_images(self, split: Split) -> TensorImages | JpegBytesImages:
        return self._contents.test if split == "val" else self._contents.train
