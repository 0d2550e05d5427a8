"""Labels a classifier cannot score: those beyond its ``num_classes``, found without a host sync."""

from __future__ import annotations

import lightning as L
import torch

from ssl_lightning.distributed import gather


class LabelRange:
    """Keeps training labels inside ``0 .. num_classes - 1`` (or -1, unlabelled) and stops the run,
    naming both numbers, when the data holds a larger one.

    Checking each batch on the host would wait for the accelerator every step, and a label out of
    range reaching ``cross_entropy`` is an index error on the CPU and a device-side assert on a GPU,
    neither naming the cause. So :meth:`masked` marks such labels -1 (they leave the loss) and
    records the largest label seen on the device; :meth:`check` reads it where reads happen anyway
    (logger steps, before validation and checkpoints, at the end), on every rank together, so the
    run stops before any checkpoint holds weights trained without those images.
    """

    def __init__(self, owner: str):
        self.owner = owner
        self._largest: torch.Tensor | None = None

    def masked(self, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
        largest = labels.max().reshape(1)
        self._largest = largest if self._largest is None else torch.maximum(self._largest, largest)
        return torch.where(labels < num_classes, labels, -1)

    def check(self, trainer: L.Trainer, num_classes: int) -> None:
        """Raise if any rank has seen a label >= ``num_classes``; call it on every rank at the same point."""
        if self._largest is None:
            return
        largest = int((gather(self._largest) if trainer.world_size > 1 else self._largest).max())
        if largest >= num_classes:
            raise ValueError(
                f"{self.owner}: a training batch holds label {largest}, but num_classes is {num_classes} (labels "
                f"must be 0..{num_classes - 1}, or -1 for unlabelled images). Set model.init_args.num_classes to at "
                f"least {largest + 1}, or fix the data's labels."
            )
