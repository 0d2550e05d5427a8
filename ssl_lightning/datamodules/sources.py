"""Raw image sources: indexable collections of (uint8 CxHxW tensor, label) pairs, decoded early.

Every DataModule turns its storage (arrays, packed JPEG bytes, files) into one of these; the view
transforms then only ever see uint8 tensors. Label -1 marks an unlabelled image.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import cached_property
from typing import Protocol

import torch
from torchvision.io import ImageReadMode, decode_jpeg

UNLABELLED = -1


class ImageSource(Protocol):
    #: one label per image, readable without decoding any image (checked against num_classes at setup)
    labels: torch.Tensor | Sequence[int]
    #: where the images come from (a file, a folder), for error messages
    origin: str

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]: ...


def check_labels(source: ImageSource, num_classes: int | None, owner: str) -> None:
    """Refuse labels outside 0..num_classes-1 and -1 (unlabelled) before training, naming the largest
    (or smallest) one; without this a bad label surfaces only as an index error in the first loss."""
    if num_classes is None or len(source.labels) == 0:
        return
    labels = torch.as_tensor(source.labels)
    low, high = int(labels.min()), int(labels.max())
    if high >= num_classes:
        bad = high
    elif low < UNLABELLED:
        bad = low
    else:
        return
    raise ValueError(
        f"{owner} ({source.origin}) holds label {bad} but num_classes is {num_classes}: labels must lie in "
        f"0..{num_classes - 1}, or be -1 for unlabelled images. Fix the labels, or the list of classes the "
        "dataset declares."
    )


class TensorImages:
    """Images held in memory as one uint8 NxCxHxW tensor (a strided view of NHWC storage is fine)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, origin: str = "images in memory") -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be a uint8 NxCxHxW tensor, got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.origin = images, labels.long(), origin

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])


class JpegBytesImages:
    """JPEG files packed into one byte array: image i is bytes offsets[i]:offsets[i+1]; decoded per item."""

    def __init__(
        self, data: torch.Tensor, offsets: torch.Tensor, labels: torch.Tensor, in_chans: int,
        origin: str = "JPEG bytes in memory",
    ) -> None:
        if len(offsets) != len(labels) + 1:
            raise ValueError(f"offsets must hold one entry more than labels; got {len(offsets)} and {len(labels)}")
        self.data, self.offsets, self.labels, self.origin = data, offsets.long(), labels.long(), origin
        self.mode = ImageReadMode.GRAY if in_chans == 1 else ImageReadMode.RGB

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        return decode_jpeg(self.data[start:end], mode=self.mode), int(self.labels[index])


def channel_stats(batches: Iterable[torch.Tensor]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std over all pixels of uint8 NxCxHxW batches (sizes may differ between
    batches), in the [0, 1] scale that Normalize sees after ToDtype."""
    total = squares = None
    count = 0
    for batch in batches:  # batch by batch so memory stays flat
        pixels = batch.transpose(0, 1).reshape(batch.shape[1], -1).double() / 255.0
        total = pixels.sum(1) if total is None else total + pixels.sum(1)
        squares = (pixels**2).sum(1) if squares is None else squares + (pixels**2).sum(1)
        count += pixels.shape[1]
    if total is None or count == 0:
        raise ValueError("cannot compute mean/std of an empty set of images")
    mean = total / count
    std = (squares / count - mean**2).clamp_min(0).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


def evenly_spaced(length: int, limit: int) -> list[int]:
    """At most `limit` indices spread over range(length), for estimating statistics on a sample."""
    if length <= limit:
        return list(range(length))
    return torch.linspace(0, length - 1, limit).round().long().tolist()


def sampled_channel_stats(images: ImageSource, limit: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``channel_stats`` of at most ``limit`` evenly spaced images of a source (one at a time: any sizes)."""
    return channel_stats(images[i][0].unsqueeze(0) for i in evenly_spaced(len(images), limit))


class ChannelStatsFromData:
    """``mean`` and ``std`` of a DataModule: given by the user, or estimated once from its training
    images by ``_estimate_stats`` (the subclass's), on first use. Put it before ``ViewDataModule``
    in the bases and call ``_keep_given_stats`` in ``__init__``."""

    _given_stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    def _keep_given_stats(self, mean: tuple[float, ...] | None, std: tuple[float, ...] | None) -> None:
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither (then both are estimated from the data)")
        self._given_stats = None if mean is None else (tuple(mean), tuple(std))

    def _estimate_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        raise NotImplementedError

    @cached_property
    def _stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return self._given_stats if self._given_stats is not None else self._estimate_stats()

    @property
    def mean(self) -> tuple[float, ...]:
        return self._stats[0]

    @property
    def std(self) -> tuple[float, ...]:
        return self._stats[1]
