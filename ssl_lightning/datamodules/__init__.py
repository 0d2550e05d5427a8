"""DataModules that yield batches of augmented views, and the view recipes they use."""

from ssl_lightning.datamodules.base import ViewDataModule
from ssl_lightning.datamodules.corruption_stream import CorruptionStream
from ssl_lightning.datamodules.corruptions import CORRUPTIONS, corrupt
from ssl_lightning.datamodules.digits import Digits
from ssl_lightning.datamodules.image_folder import ImageFolder
from ssl_lightning.datamodules.npz import NpzArrays
from ssl_lightning.datamodules.torchvision_datasets import CIFAR10, CIFAR100, STL10
from ssl_lightning.datamodules.views import VIEW_PRESETS, ViewSpec

__all__ = [
    "CIFAR10",
    "CIFAR100",
    "CORRUPTIONS",
    "CorruptionStream",
    "STL10",
    "VIEW_PRESETS",
    "Digits",
    "ImageFolder",
    "NpzArrays",
    "ViewDataModule",
    "ViewSpec",
    "corrupt",
]
