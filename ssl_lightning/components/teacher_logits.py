"""A frozen teacher's logits of every training image, computed once per fit and read back by ``index``.

Worth it only when the training views are deterministic (every epoch shows the teacher the same
tensor for an image, ``datamodules.views.views_are_deterministic``): the teacher's forward then
gives the same logits every epoch, so one pass over the training set replaces one per step.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from ssl_lightning import distributed


def shard_bounds(num_images: int, world_size: int, rank: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of ``rank``: contiguous, in rank order, sizes differing by at most one,
    so the ranks' shards concatenated in rank order are the table in index order."""
    return rank * num_images // world_size, (rank + 1) * num_images // world_size


@torch.no_grad()
def compute_teacher_logits(
    teacher: nn.Module,
    dataset: Dataset,
    device: torch.device,
    batch_size: int,
    num_workers: int = 0,
    collate_fn: Callable | None = None,
    forward_context: Callable[[], AbstractContextManager] = nullcontext,
    owner: str = "teacher logits",
) -> Tensor:
    """``teacher(views[0])`` of every item of ``dataset``, as a ``[len(dataset), classes]`` tensor on
    ``device``, row i the item at position i (whose ``index`` must be i: checked on the host, per batch).

    Under torch.distributed each rank runs the teacher on its share of the rows (``shard_bounds``)
    and the shares are all-gathered, so every rank holds the whole table (its batches draw any
    index) after 1/world_size of the forward passes. Call it on every rank. ``forward_context`` is
    the training step's precision context (autocast), so the rows equal the teacher's online
    logits, in their dtype. The teacher is used as given: a ``FrozenTeacher`` is in eval mode and
    without gradients.
    """
    num_images, world_size = len(dataset), distributed.world_size()
    if num_images < world_size:
        raise ValueError(f"{owner}: {num_images} training image(s) for {world_size} processes; every process "
                         "computes a share of the table. Use more images or fewer processes.")
    start, stop = shard_bounds(num_images, world_size, distributed.rank())
    loader = DataLoader(Subset(dataset, range(start, stop)), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, collate_fn=collate_fn)
    rows, position = [], start
    for batch in loader:
        index = batch["index"]  # on the host: reading it costs no device sync
        expected = torch.arange(position, position + len(index))
        if not torch.equal(torch.as_tensor(index).cpu(), expected):
            raise ValueError(
                f"{owner}: the training dataset's item at position {position} carries index "
                f"{torch.as_tensor(index)[0].item()}; the table is looked up by `index`, which must be the "
                "item's position in the dataset (as ViewDataModule's datasets give it)."
            )
        with forward_context():
            rows.append(teacher(batch["views"][0].to(device, non_blocking=True)))
        position += len(index)
    return distributed.gather(torch.cat(rows))


def look_up_teacher_logits(table: Tensor, batch: dict, owner: str) -> Tensor:
    """The table's rows of the batch's images: ``table[batch["index"]]``, a gather on the device
    (no host sync)."""
    if "index" not in batch:
        raise ValueError(
            f"{owner}: precompute_teacher_logits=True looks the teacher's logits up by the batch's 'index' "
            f"(each image's position in the training set), but the batch has only {sorted(batch)}. Train "
            "from a ViewDataModule (its batches carry 'index'), or set precompute_teacher_logits=False."
        )
    return table[batch["index"]]


def check_table_covers(table: Tensor, num_images: int, owner: str) -> None:
    """Stop when the training set is not the one the table was computed over (its length differs)."""
    if table.shape[0] != num_images:
        raise ValueError(
            f"{owner}: the precomputed teacher logits cover {table.shape[0]} training images, but the training "
            f"set now has {num_images}. The table is computed once at the start of fit; a training set that "
            "changes during the fit (reloaded dataloaders) needs precompute_teacher_logits=False."
        )
