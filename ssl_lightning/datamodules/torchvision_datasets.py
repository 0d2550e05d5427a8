"""CIFAR-10, CIFAR-100 and STL-10 through torchvision's classes (download, integrity check, parsing).

torchvision's datasets hold every image in one numpy array; we wrap that array as a uint8 tensor
(no copy) instead of going through PIL per item.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
import torchvision

from ssl_lightning.datamodules.base import Split, ViewDataModule
from ssl_lightning.datamodules.sources import TensorImages


def open_torchvision_dataset(cls: type, data_dir: str, download: bool, **kwargs) -> torchvision.datasets.VisionDataset:
    """Instantiate a torchvision dataset; missing files raise an error that says how to obtain them."""
    root = Path(data_dir).expanduser()
    try:
        return cls(root=str(root), download=download, **kwargs)
    except RuntimeError as err:
        if download:
            raise
        where = root / cls.base_folder
        raise FileNotFoundError(
            f"{cls.__name__} data not found (or corrupted) in {where}: pass download=True so that "
            f"torchvision.datasets.{cls.__name__} fetches it from {cls.url} into data_dir={str(root)!r} "
            "(Trainer runs prepare_data(); call it yourself outside a Trainer), or place the extracted "
            f"'{cls.base_folder}' folder under data_dir."
        ) from err


class _TorchvisionDataModule(ViewDataModule):
    """Shared arguments: `data_dir` (where torchvision keeps the files) and `download`."""

    dataset_class: ClassVar[type]

    def __init__(
        self,
        data_dir: str = "data",
        download: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.data_dir = data_dir
        self.download = download
        self._opened: dict[str, torchvision.datasets.VisionDataset] = {}

    def _open(self, key: str, **kwargs) -> torchvision.datasets.VisionDataset:
        """Each torchvision split is read from disk once (train also serves as the kNN bank)."""
        if key not in self._opened:
            self._opened[key] = open_torchvision_dataset(self.dataset_class, self.data_dir, download=False, **kwargs)
        return self._opened[key]

    def _tensor_images(self, images: torch.Tensor, labels: torch.Tensor, split: str) -> TensorImages:
        """A split's images and labels, named by folder and split for error messages."""
        folder = Path(self.data_dir).expanduser() / self.dataset_class.base_folder
        return TensorImages(images, labels, origin=f"{folder}, {split}")


class _CIFARDataModule(_TorchvisionDataModule):
    """CIFAR-10 and -100 share layout and size; they differ in class count and statistics."""

    NUM_CLASSES: ClassVar[int]
    MEAN: ClassVar[tuple[float, ...]]
    STD: ClassVar[tuple[float, ...]]

    @property
    def num_classes(self) -> int:
        return self.NUM_CLASSES

    @property
    def in_chans(self) -> int:
        return 3

    @property
    def native_image_size(self) -> int:
        return 32

    @property
    def mean(self) -> tuple[float, ...]:
        return self.MEAN

    @property
    def std(self) -> tuple[float, ...]:
        return self.STD

    def prepare_data(self) -> None:
        if self.download:
            for train in (True, False):
                open_torchvision_dataset(self.dataset_class, self.data_dir, download=True, train=train)

    def _load_images(self, split: Split) -> TensorImages:
        train = split != "val"
        dataset = self._open(f"train={train}", train=train)
        images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2)  # NHWC storage, NCHW view
        return self._tensor_images(images, torch.as_tensor(dataset.targets), f"train={train}")


class CIFAR10(_CIFARDataModule):
    """CIFAR-10 (Krizhevsky 2009): 50,000 train / 10,000 test RGB 32x32 images, 10 classes.
    Validation uses the test split. mean/std are the published training-set values."""

    dataset_class: ClassVar[type] = torchvision.datasets.CIFAR10
    NUM_CLASSES: ClassVar[int] = 10
    MEAN: ClassVar[tuple[float, ...]] = (0.4914, 0.4822, 0.4465)
    STD: ClassVar[tuple[float, ...]] = (0.2470, 0.2435, 0.2616)


class CIFAR100(_CIFARDataModule):
    """CIFAR-100 (Krizhevsky 2009): 50,000 train / 10,000 test RGB 32x32 images, 100 fine classes.
    Validation uses the test split. mean/std are the published training-set values."""

    dataset_class: ClassVar[type] = torchvision.datasets.CIFAR100
    NUM_CLASSES: ClassVar[int] = 100
    MEAN: ClassVar[tuple[float, ...]] = (0.5071, 0.4865, 0.4409)
    STD: ClassVar[tuple[float, ...]] = (0.2673, 0.2564, 0.2762)


class STL10(_TorchvisionDataModule):
    """STL-10 (Coates et al. 2011): RGB 96x96 images, 10 classes; 5,000 labelled train, 100,000
    unlabelled (label -1) and 8,000 test images.

    Trains on `train_split` ("train+unlabeled" by default, or "train" / "unlabeled"); validates on
    the test split. The kNN bank is the labelled "train" split: unlabelled images cannot vote.
    mean/std are the commonly published STL-10 values.
    """

    dataset_class: ClassVar[type] = torchvision.datasets.STL10

    def __init__(
        self,
        data_dir: str = "data",
        download: bool = True,
        train_split: str = "train+unlabeled",
        **kwargs,
    ) -> None:
        super().__init__(data_dir, download, **kwargs)
        valid = ("train+unlabeled", "train", "unlabeled")
        if train_split not in valid:
            raise ValueError(f"STL10 train_split must be one of {valid}, got {train_split!r}")
        self.train_split = train_split

    @property
    def num_classes(self) -> int:
        return 10

    @property
    def in_chans(self) -> int:
        return 3

    @property
    def native_image_size(self) -> int:
        return 96

    @property
    def mean(self) -> tuple[float, ...]:
        return (0.4467, 0.4398, 0.4066)

    @property
    def std(self) -> tuple[float, ...]:
        return (0.2603, 0.2566, 0.2713)

    def prepare_data(self) -> None:
        if self.download:  # one archive holds every split
            open_torchvision_dataset(self.dataset_class, self.data_dir, download=True, split="test")

    def _load_images(self, split: Split) -> TensorImages:
        stl_split = {"train": self.train_split, "val": "test", "bank": "train"}[split]
        dataset = self._open(stl_split, split=stl_split)
        return self._tensor_images(torch.from_numpy(dataset.data), torch.from_numpy(dataset.labels), stl_split)
