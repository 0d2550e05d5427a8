"""What a method reads from its DataModule, and the checks of the batch contract (docs/architecture.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning as L


@dataclass(frozen=True)
class DataFacts:
    batch_size: int | None
    num_classes: int | None
    in_chans: int | None
    image_size: int | None
    num_views: int | None
    num_train_images: int | None  # known once the DataModule's setup('fit') has run


def read_data_facts(trainer: L.Trainer | None) -> DataFacts | None:
    """The attached DataModule's facts, or None when the Trainer was given bare dataloaders."""
    datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
    if datamodule is None:
        return None
    return DataFacts(**{key: getattr(datamodule, key, None) for key in DataFacts.__dataclass_fields__})


def check_view_count(method: str, expected: int | tuple[int, int], got: int) -> None:
    low, high = (expected, expected) if isinstance(expected, int) else expected
    if not low <= got <= high:
        wanted = str(low) if low == high else f"{low} to {high}"
        views = "view" if wanted == "1" else "views"
        raise ValueError(
            f"{method} needs {wanted} {views} per image, but the DataModule's view recipe makes {got}. "
            "Choose a matching recipe (e.g. data.views: supervised for one view, simclr for two-view methods, "
            "dino for multi-crop)."
        )


def read_batch_size(trainer: L.Trainer) -> int:
    facts = read_data_facts(trainer)
    if facts is None or facts.batch_size is None:
        raise ValueError(
            "Cannot scale the learning rate: the batch size is unknown. Pass batch_size= to the method "
            "or use a DataModule that declares batch_size."
        )
    return facts.batch_size


def require_views(batch: Any, method: str) -> None:
    if isinstance(batch, dict) and "views" in batch:
        return
    if isinstance(batch, dict) and "image" in batch:
        raise RuntimeError(
            f"{method} got a batch with 'image' but no 'views': the DataModule's view hook "
            "(on_after_batch_transfer) did not run. Pass the DataModule to Trainer.fit(datamodule=...) "
            "instead of its dataloaders."
        )
    got = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
    raise TypeError(
        f"{method} expects a batch dict with 'views', 'label', 'index' (see DESIGN 'Data flow'); got {got}. "
        "Use an ssl_lightning DataModule or yield such dicts from your DataLoader."
    )


def per_image_memory_size(module: L.LightningModule, keeps: str) -> int:
    """Rows of a per-image memory (``IndexedMemory``): ``num_train_images`` as given (an argument, or a
    checkpoint's hyperparameters) or as the DataModule reports it; the two must agree, and one must be
    known. The size is written into the hyperparameters, so ``load_from_checkpoint`` sizes the memory
    alike. ``keeps``: what the memory holds, for the errors ("a temperature per training image")."""
    method = type(module).__name__
    given, reported = module.hparams.num_train_images, module.num_train_images
    if given is not None and reported is not None and given != reported:
        raise ValueError(
            f"{method}: num_train_images={given} (an argument, or the checkpoint's) but the DataModule has "
            f"{reported} training images. {method} keeps {keeps}, so its memory must match the training set: "
            "leave num_train_images unset to take the DataModule's, or train on the data the checkpoint saw."
        )
    size = given if given is not None else reported
    if size is None:
        raise ValueError(
            f"{method} keeps {keeps}, so it needs the number of training images: train with a DataModule (it "
            f"reports num_train_images), or pass num_train_images= to {method} when fitting on bare dataloaders."
        )
    module.hparams["num_train_images"] = size
    return size
