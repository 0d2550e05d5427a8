"""A labelled fraction of a training split: semi-supervised fine-tuning (SimCLRv2's 1% and 10%).

``labelled_subset`` picks the same number share of every class (stratified), from a seed alone, so
every rank and every rerun keeps the same images; ``PartiallyLabelled`` shows the others as
unlabelled (-1), which every loss already masks; ``LabelledImages`` keeps the labelled images alone
(SimCLRv2 fine-tunes on the labelled subset only, not on batches that are 90-99 % masked rows).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ssl_lightning.datamodules.sources import UNLABELLED, ImageSource


def labelled_subset(labels: torch.Tensor, fraction: float, seed: int, owner: str = "label_fraction") -> torch.Tensor:
    """Sorted indices of ``round(fraction * n_c)`` images of each class ``c``, drawn without
    replacement by a generator seeded with ``seed`` (the global RNG is untouched).

    Images already unlabelled (-1) are never picked. A fraction outside (0, 1], or one that leaves
    some class without a labelled image, is refused with the class and the smallest fraction that
    would keep it.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"{owner}: label_fraction must be in (0, 1] (e.g. 0.1 for 10% of the labels), got {fraction}")
    labels = torch.as_tensor(labels, dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    kept = []
    for cls in labels[labels != UNLABELLED].unique().tolist():
        members = (labels == cls).nonzero().flatten()
        count = round(fraction * len(members))
        if count == 0:
            raise ValueError(
                f"{owner}: label_fraction={fraction} keeps no labelled image of class {cls}, which has "
                f"{len(members)} image(s); use label_fraction >= {0.5 / len(members):.3g} so that every class keeps one."
            )
        kept.append(members[torch.randperm(len(members), generator=generator)[:count]])
    if not kept:
        raise ValueError(f"{owner}: the training split has no labelled image to keep a fraction of")
    return torch.cat(kept).sort().values


class PartiallyLabelled:
    """An image source whose images outside ``kept`` read as unlabelled (-1)."""

    def __init__(self, source: ImageSource, kept: torch.Tensor) -> None:
        self.source, self.kept = source, kept
        mask = torch.zeros(len(source), dtype=torch.bool)
        mask[kept] = True
        self.labels = torch.where(mask, torch.as_tensor(source.labels, dtype=torch.long), UNLABELLED)
        self.origin = f"{source.origin}, {len(kept)} of {len(source)} labelled"

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, _ = self.source[index]
        return image, int(self.labels[index])


class LabelledImages:
    """The labelled images (label >= 0) of a source alone, in their order: item ``i`` is the source's
    ``kept[i]``. Batch ``index`` values then count within this subset."""

    def __init__(self, source: ImageSource, owner: str = "unlabelled='drop'") -> None:
        labels = torch.as_tensor(source.labels, dtype=torch.long)
        self.kept = (labels != UNLABELLED).nonzero().flatten()
        if len(self.kept) == 0:
            raise ValueError(f"{owner}: the training split ({source.origin}) has no labelled image to keep")
        self.source, self.labels = source, labels[self.kept]
        self.origin = f"{source.origin}, its {len(self.kept)} labelled images only"

    def __len__(self) -> int:
        return len(self.kept)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, _ = self.source[int(self.kept[index])]
        return image, int(self.labels[index])


def write_labelled_subset(directory: str | Path, kept: torch.Tensor, fraction: float, seed: int) -> Path:
    """Record which training images kept their label (``labelled_subset.json``), so a run can be
    audited and its subset reused by another tool."""
    path = Path(directory) / "labelled_subset.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"label_fraction": fraction, "seed": seed, "num_labelled": len(kept), "indices": kept.tolist()}
    path.write_text(json.dumps(record) + "\n")
    return path
