"""The DataLoader side of device-side views: fixed-size uint8 images in, `views` made after transfer."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset
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
