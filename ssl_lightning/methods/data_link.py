"""What a method reads from its DataModule (DESIGN: "A DataModule exposes what a method needs")."""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L


@dataclass(frozen=True)
class DataFacts:
    batch_size: int | None
    num_classes: int | None
    in_chans: int | None
    image_size: int | None
    num_views: int | None


def read_data_facts(trainer: L.Trainer | None) -> DataFacts | None:
    """The attached DataModule's facts, or None when the Trainer was given bare dataloaders."""
    datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
    if datamodule is None:
        return None
    return DataFacts(**{key: getattr(datamodule, key, None) for key in DataFacts.__dataclass_fields__})
