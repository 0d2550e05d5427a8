"""Image files on disk: listing a folder (labelled by sub-folder, or flat), checking, decoding.

Every non-hidden file counts as an image, so a stray or broken file is reported instead of being
silently left out; hidden files and folders (names starting with ".") are ignored.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image
from torchvision.transforms.v2 import functional as F

from ssl_lightning.datamodules.sources import UNLABELLED


@dataclass(frozen=True)
class FolderListing:
    paths: list[Path]
    labels: list[int]
    classes: list[str] | None  # None: a flat folder of unlabelled images


def _visible(entries: list[os.DirEntry]) -> list[os.DirEntry]:
    return sorted((entry for entry in entries if not entry.name.startswith(".")), key=lambda entry: entry.name)


def _files_below(folder: str) -> list[Path]:
    found = []
    for parent, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(name for name in dirs if not name.startswith("."))
        found += [Path(parent, name) for name in sorted(files) if not name.startswith(".")]
    return found


def list_image_folder(root: Path, classes: list[str] | None = None) -> FolderListing:
    """`root/<class>/**/<file>` gives labels by sorted class name (or by `classes`, when given, so a
    validation folder uses the training folder's numbering); a flat `root/<file>` gives label -1."""
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    with os.scandir(root) as scan:
        entries = _visible(list(scan))
    subdirs = [entry.name for entry in entries if entry.is_dir()]
    loose = [entry.name for entry in entries if not entry.is_dir()]
    if subdirs and loose:
        raise ValueError(
            f"{root} mixes class folders {subdirs[:3]} with loose files {loose[:3]}: use either "
            "root/<class>/<image> (labelled) or root/<image> (unlabelled)"
        )
    if not subdirs:
        paths = [root / name for name in loose]
        listing = FolderListing(paths, [UNLABELLED] * len(paths), None)
    else:
        numbering = classes or subdirs
        unknown = sorted(set(subdirs) - set(numbering))
        if unknown:
            raise ValueError(f"{root} has class folders {unknown} that the training folder lacks")
        index = {name: i for i, name in enumerate(numbering)}
        paths, labels = [], []
        for name in subdirs:
            files = _files_below(str(root / name))
            paths += files
            labels += [index[name]] * len(files)
        listing = FolderListing(paths, labels, list(numbering))
    if not listing.paths:
        raise ValueError(f"image folder {root} is empty: no image files found")
    return listing


def check_image_headers(listing: FolderListing, skip_corrupt: bool) -> FolderListing:
    """Open each file's header with PIL (cheap: pixels are not decoded) to catch non-images early."""
    bad: list[tuple[Path, str]] = []
    for path in listing.paths:
        try:
            with Image.open(path):
                pass
        except (OSError, ValueError) as err:  # PIL.UnidentifiedImageError is an OSError
            if not skip_corrupt:
                raise ValueError(
                    f"cannot read {path} as an image ({err}); remove it or pass skip_corrupt=True"
                ) from err
            bad.append((path, str(err)))
    if not bad:
        return listing
    rank_zero_warn(f"skipping {len(bad)} unreadable file(s): " + ", ".join(str(path) for path, _ in bad))
    skipped = {path for path, _ in bad}
    kept = [(path, label) for path, label in zip(listing.paths, listing.labels) if path not in skipped]
    if not kept:
        raise ValueError(f"no readable image left after skipping {len(bad)} unreadable file(s)")
    paths, labels = (list(column) for column in zip(*kept))
    return FolderListing(paths, labels, listing.classes)


class FileImages:
    """Image files decoded with PIL per item, converted to RGB (in_chans 3) or L (in_chans 1)."""

    def __init__(self, listing: FolderListing, in_chans: int) -> None:
        if in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3 for image files, got {in_chans}")
        self.paths, self.labels = listing.paths, listing.labels
        self.mode = "L" if in_chans == 1 else "RGB"

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path = self.paths[index]
        try:
            with Image.open(path) as image:
                pixels = F.pil_to_tensor(image.convert(self.mode))
        except (OSError, ValueError) as err:  # a file whose header passed but whose data is broken
            raise OSError(f"cannot decode image {path}: {err}") from err
        return pixels, self.labels[index]
