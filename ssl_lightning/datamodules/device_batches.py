"""The DataLoader side of device-side views: fixed-size uint8 images in (or only indices, with the
dataset held on the device), `views` made after transfer; and where `view_device: auto` puts them."""

from __future__ import annotations

from typing import Literal

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from ssl_lightning.datamodules.device_views import DeviceViews
from ssl_lightning.datamodules.sampling import split_seeded_item
from ssl_lightning.datamodules.sources import ImageSource


class FixedSizeImages(Dataset):
    """Items {"image": uint8 CxSxS, "label", "index"} (and "seed" for SeededSampler items): images
    are batched before any view is drawn, so every image must have one size; others are resized
    (shorter side) and centre-cropped to S."""

    def __init__(self, source: ImageSource, size: int) -> None:
        self.source, self.size = source, size
        self.resize = v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size)])

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item: int | tuple[int, int]) -> dict:
        index, seed = split_seeded_item(item)
        image, label = self.source[index]
        if image.dtype != torch.uint8:
            raise TypeError(f"device-side views need uint8 images; item {index} is {image.dtype}")
        if tuple(image.shape[-2:]) != (self.size, self.size):
            image = self.resize(image)
        return {"image": image, "label": label, "index": index} | ({} if seed is None else {"seed": seed})


def make_views_on_device(batch: dict, views: DeviceViews) -> dict:
    """Replaces a batch's uint8 `image` with the recipe's `views`; other keys pass through.

    A batch from a SeededSampler carries ``seed`` (an int, see ``ViewDataModule.on_before_batch_transfer``):
    the views are drawn from a generator seeded with it, so they are the same after a resume and
    differ between processes (each holds other samples). Without it the global RNG is used.
    """
    image = batch["image"]
    if not isinstance(image, torch.Tensor) or image.dim() != 4:
        raise TypeError(
            "device-side views need one uint8 BxCxHxW tensor under 'image' (images of one size); "
            f"got {type(image).__name__} {getattr(image, 'shape', '')}"
        )
    generator = None
    if "seed" in batch:
        generator = torch.Generator(device=image.device).manual_seed(int(batch["seed"]))
    rest = {key: value for key, value in batch.items() if key not in ("image", "seed")}
    return {**rest, "views": views.to(image.device)(image, generator)}


#: Largest view size at which batched views were measured faster than the per-image pipeline on one
#: CPU thread (benchmarks/RESULTS.md "View throughput": 5.6x at 32 px, 1.5-1.8x at 96-224 px).
BATCHED_MEASURED_FASTER_UP_TO = 224


def resolve_view_device(
    requested: str, augments: bool, one_stored_size: bool, image_size: int, device_type: str
) -> Literal["cpu", "device"]:
    """Where training views are drawn for ``view_device: auto`` (explicit choices pass through).

    Batched views need a recipe that augments (the plain view is a resize, nothing to batch) and a
    dataset stored at one image size: varied sizes would be resized and centre-cropped *before* the
    random crop, which changes what the crops can see. Given both, the batched path is the faster
    one on an accelerator and, on the CPU, at every size measured (up to 224 px).
    """
    if requested != "auto":
        return requested
    if not (augments and one_stored_size):
        return "cpu"
    if device_type != "cpu" or image_size <= BATCHED_MEASURED_FASTER_UP_TO:
        return "device"
    return "cpu"


class ImagesInMemory:
    """A training split held as one uint8 NxCxSxS tensor (and its labels), copied to the training
    device on first use; batches then carry only indices and the pixels are gathered there."""

    def __init__(self, source: ImageSource, size: int, num_workers: int = 0) -> None:
        loader = DataLoader(FixedSizeImages(source, size), batch_size=1024, num_workers=num_workers)
        images, labels = zip(*((batch["image"], batch["label"]) for batch in loader))
        self.images, self.labels = torch.cat(images), torch.cat(labels)
        self._on_device: tuple[torch.device, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        if self._on_device is None or self._on_device[0] != index.device:
            self._on_device = (index.device, self.images.to(index.device))
        return self._on_device[1][index]


class IndexItems(Dataset):
    """Training items of the in-memory mode: {"label", "index"} (and "seed"), no pixels.

    The DataLoader fetches a whole batch at once through ``__getitems__`` and ``collate_batch``
    passes it through, so a step costs a few tensor ops instead of a Python call per image.
    """

    def __init__(self, images: ImagesInMemory) -> None:
        self.labels = images.labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, item: int | tuple[int, int]) -> dict:
        return self.__getitems__([item])

    def __getitems__(self, items: list) -> dict:
        pairs = [split_seeded_item(item) for item in items]
        index = torch.tensor([index for index, _ in pairs])
        batch = {"label": self.labels[index], "index": index}
        seeds = [seed for _, seed in pairs]
        return batch if seeds[0] is None else {**batch, "seed": torch.tensor(seeds)}

    @staticmethod
    def collate_batch(batch: dict) -> dict:
        return batch
