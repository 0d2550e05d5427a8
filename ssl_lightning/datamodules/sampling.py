"""Training data order that a checkpoint can resume exactly, mid-epoch included.

Every random choice of the training data is a function of ``(seed, epoch, index)``:

* the order of an epoch is a permutation drawn from a generator seeded by ``(seed, epoch)``, sharded
  over the processes as ``DistributedSampler`` shards it;
* each sample's augmentation seed is drawn from the same generator, one per dataset index, so a
  sample gets the same views in a given epoch whatever the number of processes or workers;
* the sampler yields ``(index, sample_seed)`` pairs; the dataset draws the views of that item
  under ``sample_seed`` (:func:`seeded_rng`), and device-side views seed their generator from the
  batch's seeds.

Nothing therefore depends on which worker loaded an item or on the global RNG, and resuming is
skipping: :class:`ResumableDataLoader` reports how many samples of the epoch training has consumed
(the DataModule stores it in each checkpoint) and, on restore, the sampler starts the epoch's order
at that position.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from time import perf_counter

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

SEED_BITS = 62  # per-sample seeds fit an int64 tensor once collated


@dataclass(frozen=True)
class Position:
    """Where training stands in the data: ``samples_done`` of this process's share of ``epoch``."""

    epoch: int
    samples_done: int


class SeededSampler(DistributedSampler):
    """Shuffled, sharded indices with per-sample augmentation seeds; resumable mid-epoch.

    A ``DistributedSampler`` (so Lightning neither replaces nor re-wraps it under DDP) whose epoch
    order and per-sample seeds depend only on ``(seed, epoch)``. Lightning calls ``set_epoch``
    at each epoch start. ``resume_at`` makes the next pass over the same epoch start where a
    checkpoint left it; ``len()`` stays the full share, so Lightning's epoch length is unchanged.
    """

    def __init__(self, dataset_size: int, num_replicas: int = 1, rank: int = 0, seed: int | None = None) -> None:
        if seed is None:
            seed = secrets.randbits(SEED_BITS)  # not from the global RNG, which the model's randomness uses
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        super().__init__(range(dataset_size), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self._resume: Position | None = None

    def epoch_draw(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The epoch's global order and the augmentation seed of every dataset index."""
        mixed = np.random.SeedSequence([self.seed, epoch]).generate_state(1, np.uint64)[0]
        generator = torch.Generator().manual_seed(int(mixed))
        order = torch.randperm(len(self.dataset), generator=generator)
        seeds = torch.randint(0, 2**SEED_BITS, (len(self.dataset),), generator=generator)
        return order, seeds

    def shard(self, order: torch.Tensor) -> torch.Tensor:
        """This process's share of an epoch's order, padded as DistributedSampler pads."""
        padding = self.total_size - len(order)
        if padding > 0:
            order = torch.cat([order, order.repeat(math.ceil(padding / len(order)))[:padding]])
        return order[self.rank : self.total_size : self.num_replicas]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order, seeds = self.epoch_draw(self.epoch)
        mine = self.shard(order)
        start = 0
        if self._resume is not None and self._resume.epoch == self.epoch:
            start = self._resume.samples_done
        self._resume = None
        mine = mine[start:]
        # One conversion per epoch: the main process hands out every index of the epoch from here.
        yield from zip(mine.tolist(), seeds[mine].tolist())

    def resume_at(self, position: Position) -> None:
        """Start the next pass at ``position`` (its epoch becomes the current one)."""
        if not 0 <= position.samples_done <= self.num_samples:
            raise ValueError(
                f"cannot resume at sample {position.samples_done} of an epoch of {self.num_samples} samples per "
                "process: the checkpoint was written for another dataset size or number of processes"
            )
        self.set_epoch(position.epoch)
        self._resume = position

    def load_state_dict(self, state: dict) -> None:
        """Continue a run from a :meth:`ResumableDataLoader.state_dict`: its seed, epoch and position."""
        self.seed = int(state["seed"])  # the run's own order, even if the config's seed changed since
        samples_done = int(state["samples_done"])
        saved_replicas = int(state.get("num_replicas", self.num_replicas))
        if saved_replicas != self.num_replicas:
            # Each process then holds another share of the epoch: skip the same fraction of it.
            samples_done = min(self.num_samples, samples_done * saved_replicas // self.num_replicas)
            rank_zero_warn(
                f"The checkpoint was written by {saved_replicas} process(es) and this run has {self.num_replicas}: "
                "the resumed epoch skips the same number of samples overall, but not the same samples."
            )
        self.resume_at(Position(int(state["epoch"]), samples_done))


class ResumableDataLoader(DataLoader):
    """A DataLoader over a :class:`SeededSampler` whose state is where training stands in the data.

    ``consumed_batches`` says how many batches of the current epoch training has taken and whether
    that finishes the epoch; it is asked rather than counted here, because the loader's workers and
    Lightning's prefetching run ahead of training. Having ``state_dict``/``load_state_dict`` also
    tells Lightning that a mid-epoch checkpoint of this loader can be resumed.
    """

    def __init__(self, *args, consumed_batches: Callable[[], tuple[int, bool]] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, SeededSampler):
            raise TypeError(f"ResumableDataLoader needs a SeededSampler, got {type(self.sampler).__name__}")
        self.consumed_batches = consumed_batches
        #: host seconds the training process has spent waiting for batches (``callbacks.InputWait``)
        self.wait_seconds = 0.0

    def __iter__(self) -> Iterator:
        return WaitTimedIterator(super().__iter__(), self)

    def state_dict(self) -> dict:
        sampler: SeededSampler = self.sampler
        batches, epoch_finished = self.consumed_batches() if self.consumed_batches is not None else (0, False)
        state = {"seed": sampler.seed, "num_replicas": sampler.num_replicas}
        if epoch_finished:
            return {**state, "epoch": sampler.epoch + 1, "samples_done": 0}
        return {**state, "epoch": sampler.epoch, "samples_done": batches * self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


class WaitTimedIterator:
    """A DataLoader iterator that adds the host time of every ``next`` to its loader's
    ``wait_seconds``: with workers, the time the training process waits for them; without, the
    time it spends loading."""

    def __init__(self, iterator: Iterator, loader: ResumableDataLoader) -> None:
        self._iterator, self._loader = iterator, loader

    def __iter__(self) -> WaitTimedIterator:
        return self

    def __next__(self):
        start = perf_counter()
        try:
            return next(self._iterator)
        finally:
            self._loader.wait_seconds += perf_counter() - start

    def __len__(self) -> int:
        return len(self._iterator)


def split_seeded_item(item: int | tuple[int, int]) -> tuple[int, int | None]:
    """``(index, sample_seed)`` from a SeededSampler item, ``(index, None)`` from a plain index."""
    if isinstance(item, tuple):
        return item
    return item, None


@contextmanager
def seeded_rng(seed: int | None):
    """Run the block with torch's CPU generator seeded by ``seed``, restoring its state afterwards
    (with ``num_workers=0`` datasets run in the training process, whose RNG the model uses)."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield
