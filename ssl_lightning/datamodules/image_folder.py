"""ImageFolder: images as files, labelled by class sub-folder or an unlabelled flat folder."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from ssl_lightning.datamodules.base import Split, ViewDataModule
from ssl_lightning.datamodules.image_files import (
    FileImages,
    FolderListing,
    check_image_files,
    list_image_folder,
)
from ssl_lightning.datamodules.sources import (
    ChannelStatsFromData,
    sampled_channel_stats,
)

STATS_SAMPLE = 512  # files decoded to estimate mean/std: large images make each one costly
DEFAULT_IMAGE_SIZE = 224  # files have no common size; ImageNet's convention


class ImageFolder(ChannelStatsFromData, ViewDataModule):
    """Images from `train_dir` and, optionally, `val_dir` (without it there is no validation).

    Each folder is either `<dir>/<class>/**/<image>` (labels numbered by sorted class name of
    `train_dir`) or a flat `<dir>/<image>` (label -1). Files are decoded with PIL and converted to
    RGB (in_chans=3) or grayscale (in_chans=1). At setup every file's header is opened: a file
    PIL cannot identify raises an error naming it. A file whose header is whole but whose pixels
    are not (a truncated JPEG) fails when a DataLoader worker decodes it, with an error naming it.
    With `skip_corrupt=True` setup decodes every file in full instead (on `num_workers` threads;
    about one epoch of decoding) and leaves out each that fails, with one warning that counts them
    and names the first few. mean/std, unless given, are estimated from up to 512 evenly spaced
    training images; image_size (default 224) is the side of the global views.
    """

    # Files come in any size, so `view_device: auto` keeps views per image (random crops of the
    # whole image); "device" would first resize and centre-crop every image to image_size.
    stores_one_image_size = False

    def __init__(
        self,
        train_dir: str,
        val_dir: str | None = None,
        image_size: int = DEFAULT_IMAGE_SIZE,
        in_chans: int = 3,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        skip_corrupt: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(image_size=image_size, **kwargs)
        if in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3 for image files, got {in_chans}")
        self._keep_given_stats(mean, std)
        self.train_dir = Path(train_dir).expanduser()
        self.val_dir = None if val_dir is None else Path(val_dir).expanduser()
        self._in_chans = in_chans
        self.skip_corrupt = skip_corrupt
        self._checked: dict[str, FileImages] = {}

    @cached_property
    def _train_listing(self) -> FolderListing:
        return list_image_folder(self.train_dir)

    def _estimate_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return sampled_channel_stats(self._images("train"), STATS_SAMPLE)

    @property
    def num_classes(self) -> int | None:
        classes = self._train_listing.classes
        return None if classes is None else len(classes)

    @property
    def in_chans(self) -> int:
        return self._in_chans

    @property
    def native_image_size(self) -> int:
        return DEFAULT_IMAGE_SIZE

    def _images(self, folder: str) -> FileImages:
        """Listed and checked once per folder; the kNN bank reuses the training files."""
        if folder not in self._checked:
            if folder == "train":
                listing = self._train_listing
            else:
                listing = list_image_folder(self.val_dir, classes=self._train_listing.classes)
            checked = check_image_files(listing, self.skip_corrupt, threads=self.num_workers)
            self._checked[folder] = FileImages(checked, self.in_chans)
        return self._checked[folder]

    def _load_images(self, split: Split) -> FileImages | None:
        if split == "val":
            return None if self.val_dir is None else self._images("val")
        return self._images("train")
