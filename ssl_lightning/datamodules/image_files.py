"""Image files on disk: listing a folder (labelled by sub-folder, or flat), checking, decoding.

Every non-hidden file counts as an image, so a stray or broken file is reported instead of being
silently left out; hidden files and folders (names starting with ".") are ignored.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from itertools import chain
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image
from torchvision.transforms.v2 import functional as F

from ssl_lightning.datamodules.sources import UNLABELLED

#: files each decoding thread takes at a time (one future per file would cost more than the files)
DECODE_CHUNK = 256
#: skipped files a warning names; the rest are counted
NAMED_IN_WARNING = 5


@dataclass(frozen=True)
class FolderListing:
    root: Path
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
        listing = FolderListing(root, paths, [UNLABELLED] * len(paths), None)
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
        listing = FolderListing(root, paths, labels, list(numbering))
    if not listing.paths:
        raise ValueError(f"image folder {root} is empty: no image files found")
    return listing


def header_problem(path: Path) -> str | None:
    """Why PIL cannot open the file's header (cheap: no pixels are decoded), or None."""
    try:
        with Image.open(path):
            return None
    except (OSError, ValueError) as err:  # PIL.UnidentifiedImageError is an OSError
        return str(err)


def decode_problem(path: Path) -> str | None:
    """Why the file's pixels do not decode (a truncated JPEG passes the header check), or None."""
    try:
        with Image.open(path) as image:
            image.load()
            return None
    except (OSError, ValueError) as err:
        return str(err)


def decode_problems(paths: list[Path], threads: int) -> list[str | None]:
    """``decode_problem`` of every file, on ``threads`` threads: Pillow releases the GIL while it decodes."""
    chunks = [paths[i : i + DECODE_CHUNK] for i in range(0, len(paths), DECODE_CHUNK)]
    with ThreadPoolExecutor(max(1, threads)) as pool:
        return list(chain.from_iterable(pool.map(lambda chunk: [decode_problem(path) for path in chunk], chunks)))


def check_image_files(listing: FolderListing, skip_corrupt: bool, threads: int = 1) -> FolderListing:
    """Catch bad files at setup. Without ``skip_corrupt`` each header is opened (cheap) and the first
    file that is not an image is an error naming it; a file whose header is whole but whose pixels
    are broken fails later, when a DataLoader worker decodes it. With ``skip_corrupt`` every file is
    decoded in full (about one epoch of decoding, on ``threads`` threads) and each one that fails is
    left out, all named in one warning (the first few by name, the rest counted)."""
    if not skip_corrupt:
        for path in listing.paths:
            problem = header_problem(path)
            if problem is not None:
                raise ValueError(f"cannot read {path} as an image ({problem}); remove it or pass skip_corrupt=True")
        return listing
    problems = decode_problems(listing.paths, threads)
    bad = [(path, problem) for path, problem in zip(listing.paths, problems) if problem is not None]
    if not bad:
        return listing
    named = ", ".join(str(path) for path, _ in bad[:NAMED_IN_WARNING])
    more = f" and {len(bad) - NAMED_IN_WARNING} more" if len(bad) > NAMED_IN_WARNING else ""
    rank_zero_warn(f"skipping {len(bad)} unreadable file(s): {named}{more}. First error: {bad[0][1]}")
    kept = [(path, label) for path, label, problem in zip(listing.paths, listing.labels, problems) if problem is None]
    if not kept:
        raise ValueError(f"no readable image left in {listing.root} after skipping {len(bad)} unreadable file(s)")
    paths, labels = (list(column) for column in zip(*kept))
    return replace(listing, paths=paths, labels=labels)


class FileImages:
    """Image files decoded with PIL per item, converted to RGB (in_chans 3) or L (in_chans 1)."""

    def __init__(self, listing: FolderListing, in_chans: int) -> None:
        if in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3 for image files, got {in_chans}")
        self.paths, self.labels, self.origin = listing.paths, listing.labels, str(listing.root)
        self.mode = "L" if in_chans == 1 else "RGB"

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path = self.paths[index]
        try:
            with Image.open(path) as image:
                pixels = F.pil_to_tensor(image.convert(self.mode))
        except (OSError, ValueError) as err:  # a file whose header passed but whose data is broken
            raise OSError(
                f"cannot decode image {path}: {err}. Setup reads only the headers of image files; remove the "
                "file, or pass skip_corrupt=True to decode every file at setup and leave out those that fail."
            ) from err
        return pixels, self.labels[index]
