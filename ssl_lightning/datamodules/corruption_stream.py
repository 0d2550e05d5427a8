"""CorruptionStream: a labelled test set, corrupted locally, streamed domain after domain for
test-time adaptation (the protocols of the mariodoebler/test-time-adaptation benchmark).

A domain is a (corruption, severity) pair of ``corruptions.py``. The corrupted images are
"regenerated" CIFAR-10-C / ImageNet-C (same constants, other random draws, generated frost textures,
see docs/corruptions.md) and cached on disk, so each is made once per (dataset, corruption,
severity, seed).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.distributed import DistributedSampler

from ssl_lightning.datamodules.base import ViewDataModule
from ssl_lightning.datamodules.corruption_constants import FAMILIES
from ssl_lightning.datamodules.corruptions import CORRUPTIONS, check_corruption_name, constants_for_size, corrupt
from ssl_lightning.datamodules.device_batches import ImagesInMemory
from ssl_lightning.datamodules.views import MultiViewTransform, resolve_views

Protocol = Literal["continual", "reset_each_shift", "gradual", "mixed_domains", "correlated"]
PROTOCOLS = ("continual", "reset_each_shift", "gradual", "mixed_domains", "correlated")
GRADUAL_SEVERITIES = (1, 2, 3, 4, 5, 4, 3, 2, 1)  # the benchmark's sequence per corruption
#: bump when a corruption's output changes, so that older cache files are not read
CACHE_VERSION = 1
#: pixels (N x C x H x W) corrupted per call, bounding the float temporaries (~2 x 64 MB)
CHUNK_PIXELS = 2**24
#: the benchmark keeps each Dirichlet chunk at 10 images or more (fewer for very small test sets)
DIRICHLET_MIN_CHUNK = 10


def derived_seed(seed: int, *purpose: object) -> int:
    """A 63-bit seed for one purpose of a run seed, the same on every platform and Python."""
    words = [seed, *(zlib.crc32(str(part).encode()) for part in purpose)]
    low, high = np.random.SeedSequence(words).generate_state(2)
    return int(high) << 31 | int(low) >> 1


def dirichlet_label_order(labels: np.ndarray, delta: float, rng: np.random.Generator) -> np.ndarray:
    """A temporally correlated order of ``labels`` (the benchmark's ``sort_by_dirichlet``, from NOTE,
    Gong et al. 2022): each class is split over K = num_classes chunks with Dirichlet(delta)
    proportions (a chunk stops taking images once it holds N / K), the split redrawn until every
    chunk holds at least 10 images; then chunk after chunk, its classes in a random order. A small
    delta puts most of a class in one chunk: long runs of one label."""
    n, num_classes = len(labels), int(labels.max()) + 1
    min_chunk = min(DIRICHLET_MIN_CHUNK, n // num_classes)
    for _ in range(1000):
        chunks: list[list[int]] = [[] for _ in range(num_classes)]
        by_class: list[list[np.ndarray]] = [[] for _ in range(num_classes)]  # per chunk, its part of each class
        for k in range(num_classes):
            members = np.flatnonzero(labels == k)
            rng.shuffle(members)
            proportions = rng.dirichlet(np.full(num_classes, delta))
            proportions *= np.array([len(chunk) < n / num_classes for chunk in chunks])
            cuts = (np.cumsum(proportions / proportions.sum()) * len(members)).astype(int)[:-1]
            for chunk, parts, part in zip(chunks, by_class, np.split(members, cuts)):
                chunk.extend(part.tolist())
                parts.append(part)
        if min(len(chunk) for chunk in chunks) >= min_chunk:
            break
    else:
        raise ValueError(f"no Dirichlet split with delta={delta} kept every chunk at {min_chunk}+ images in 1000 "
                         "draws: raise dirichlet_delta")
    order = []
    for parts in by_class:
        for k in rng.permutation(num_classes):
            order.append(parts[k])
    return np.concatenate(order)


class StreamBatches(Dataset):
    """Items are whole batches: ``(start, end, reset)`` slices of the stream, turned into a batch
    dict through the plain (un-augmented) view of the source DataModule."""

    def __init__(self, domain_images: list[torch.Tensor], labels: torch.Tensor, source_index: torch.Tensor,
                 stream_domain: torch.Tensor, stream_position: torch.Tensor, transform: MultiViewTransform) -> None:
        self.domain_images, self.labels, self.source_index = domain_images, labels, source_index
        self.stream_domain, self.stream_position, self.transform = stream_domain, stream_position, transform

    def __len__(self) -> int:
        return len(self.stream_domain)

    def __getitem__(self, item: tuple[int, int, bool]) -> dict:
        start, end, reset = item
        domains, positions = self.stream_domain[start:end], self.stream_position[start:end]
        views = [self.transform(self.domain_images[d][p])[0] for d, p in zip(domains.tolist(), positions.tolist())]
        return {
            "views": [torch.stack(views)],
            "label": self.labels[positions],
            "index": self.source_index[positions],
            "domain": domains.clone(),
            "reset": torch.full((end - start,), reset, dtype=torch.bool),
        }


class StreamSampler(DistributedSampler):
    """Yields this process's share of each global batch, in stream order: a global batch is split
    into ``num_replicas`` contiguous parts (sizes differing by one at most), so every process sees
    the same domain at the same step. A ``DistributedSampler``, so Lightning leaves it in place."""

    def __init__(self, batches: list[tuple[int, int, bool]], num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(batches, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for start, end, reset in self.batches:
            bounds = np.linspace(start, end, self.num_replicas + 1).round().astype(int)
            yield int(bounds[self.rank]), int(bounds[self.rank + 1]), reset


class CorruptionStream(L.LightningDataModule):
    """The test split of ``source``, corrupted and streamed domain by domain for test-time adaptation.

    Domains are (corruption, severity) pairs in the benchmark's order (``corruptions.CORRUPTIONS``).
    Protocols (Marsden, Döbler et al., mariodoebler/test-time-adaptation; RMT, CVPR 2023; ROID, WACV 2024):

    - ``continual``: every corruption at every severity, one domain after the other, no reset;
    - ``reset_each_shift``: the same order; batches carry ``reset`` (all True in the first batch of
      each domain) so that a method restores its source state there;
    - ``gradual``: per corruption the severities 1, 2, 3, 4, 5, 4, 3, 2, 1 (with ``severities`` of
      more than one entry, that list instead, as the benchmark);
    - ``mixed_domains``: every (image, domain) pair once, all shuffled together;
    - ``correlated``: the continual order, within each domain the images in a Dirichlet(delta) label
      order (long runs of one class; ``dirichlet_label_order``). Needs labels.

    Within a domain the images come in one seeded order, the same for every domain (the benchmark
    shuffles each domain with the same seed). Batches never straddle two domains except under
    ``mixed_domains``; each holds ``{"views": [float B x C x S x S], "label", "index", "domain",
    "reset"}``: the view is the source DataModule's plain view (resize, centre crop, normalise with
    its mean and std), ``label`` is -1 where the source has none, ``index`` the image's position in
    the source's test split, ``domain`` an index into ``domains``.

    Corrupted images are cached as ``<cache_dir>/<source class>-<fingerprint>/<corruption>-s<severity>
    -seed<seed>-<constants>-v<version>.npz`` (uint8 ``images`` plus what made them), where the
    fingerprint hashes the selected clean images at ``image_size``, so any change of data, size or
    ``num_samples`` makes new files; written to a temporary file and renamed, so an interrupted run
    leaves no partial cache. ``prepare_data`` (one process per node) fills the cache; ``setup``
    reads it, generating what is missing.

    Args:
        source: a DataModule whose test split (the one ``test_dataloader`` serves) is corrupted; in a
            config, ``class_path``/``init_args`` as for ``data`` (docs/corruptions.md). Only its test
            split, ``image_size``, mean and std are used.
        corruptions: names from ``CORRUPTIONS``; None = all 15 in the benchmark's order.
        severities: 1-5, each corruption at each, in the order given (default [5]).
        protocol: see above.
        seed: the corruptions' random draws, the image order and ``num_samples``' subset.
        num_samples: images per domain, drawn at random (seeded) from the test split as the
            benchmark's ``random.sample``; None = all.
        batch_size: images per batch and per process (the benchmark's 200 on one device; over P
            processes a step consumes P x batch_size images, split evenly).
        num_workers: DataLoader workers (each makes whole batches).
        cache_dir: where corrupted test sets are kept.
        dirichlet_delta: the Dirichlet concentration of ``correlated`` (the benchmark's 0.1).
        constants: "auto" (by image size, ``corruptions.constants_for_size``) or a family of
            ``corruption_constants.FAMILIES``.
        pin_memory: page-locked batches; None = on when the trainer runs on CUDA.
    """

    def __init__(
        self,
        source: ViewDataModule,
        corruptions: list[str] | None = None,
        severities: list[int] = [5],  # noqa: B006 (copied into a tuple, never mutated)
        protocol: Protocol = "continual",
        seed: int = 1,
        num_samples: int | None = None,
        batch_size: int = 200,
        num_workers: int = 2,
        cache_dir: str = "data/corruptions",
        dirichlet_delta: float = 0.1,
        constants: str = "auto",
        pin_memory: bool | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(source, ViewDataModule):
            raise ValueError(f"source must be one of our DataModules (a ViewDataModule), got {type(source).__name__}")
        names = list(CORRUPTIONS) if corruptions is None else list(corruptions)
        if not names:
            raise ValueError(f"corruptions is empty: give names from {', '.join(CORRUPTIONS)}, or None for all")
        for name in names:
            check_corruption_name(name)
        if not severities or any(isinstance(s, bool) or s not in (1, 2, 3, 4, 5) for s in severities):
            raise ValueError(f"severities must be a non-empty list of 1-5, got {severities!r}")
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        if num_samples is not None and num_samples < 1:
            raise ValueError(f"num_samples must be positive or None (all test images), got {num_samples}")
        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"batch_size must be >= 1 and num_workers >= 0, got {batch_size} and {num_workers}")
        if dirichlet_delta <= 0:
            raise ValueError(f"dirichlet_delta must be positive, got {dirichlet_delta}")
        if constants != "auto" and constants not in FAMILIES:
            raise ValueError(f"constants must be 'auto' or one of {list(FAMILIES)}, got {constants!r}")
        self.source = source
        self.corruptions, self.severities = tuple(names), tuple(severities)
        self.protocol, self.seed, self.num_samples = protocol, seed, num_samples
        self._batch_size, self.num_workers, self.pin_memory = batch_size, num_workers, pin_memory
        self.cache_dir, self.dirichlet_delta, self.constants = Path(cache_dir).expanduser(), dirichlet_delta, constants
        self._dataset: StreamBatches | None = None
        self._segments: list[tuple[int, int]] = []

    # Data facts, from the source (readable before setup).

    @property
    def num_classes(self) -> int | None:
        return self.source.num_classes

    @property
    def in_chans(self) -> int:
        return self.source.in_chans

    @property
    def image_size(self) -> int:
        return self.source.image_size

    @property
    def mean(self) -> tuple[float, ...]:
        return self.source.mean

    @property
    def std(self) -> tuple[float, ...]:
        return self.source.std

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def num_views(self) -> int:
        return 1

    @property
    def domains(self) -> list[tuple[str, int]]:
        """(corruption, severity) per value of a batch's ``domain``: the stream's segments in order
        (under ``gradual`` a pair recurs), or under ``mixed_domains`` the domains that are mixed."""
        if self.protocol == "gradual":
            severities = GRADUAL_SEVERITIES if len(self.severities) == 1 else self.severities
            return [(name, severity) for name in self.corruptions for severity in severities]
        return [(name, severity) for name in self.corruptions for severity in self.severities]

    @property
    def domain_names(self) -> list[str]:
        return [f"{name}_{severity}" for name, severity in self.domains]

    @property
    def constants_family(self) -> str:
        return constants_for_size(self.image_size) if self.constants == "auto" else self.constants

    # Lightning hooks.

    def prepare_data(self) -> None:
        self.source.prepare_data()
        images, _, _ = self._clean_images()
        fingerprint = self._fingerprint(images)
        for name, severity in dict.fromkeys(self.domains):
            self._corrupted(images, fingerprint, name, severity)

    def setup(self, stage: str) -> None:
        if stage != "test":
            raise ValueError(
                f"CorruptionStream serves the test stage (test-time adaptation runs in `test`), not {stage!r}"
            )
        images, labels, source_index = self._clean_images()
        fingerprint = self._fingerprint(images)
        unique = list(dict.fromkeys(self.domains))
        corrupted = {domain: self._corrupted(images, fingerprint, *domain) for domain in unique}
        if self.protocol == "correlated" and bool((labels < 0).any()):
            raise ValueError("protocol 'correlated' orders images by label, but the source's test split has "
                             "unlabelled images (label -1): use another protocol or a labelled test split")
        stream_domain, stream_position, segments = self._stream_order(len(images), labels)
        plain = MultiViewTransform(resolve_views("none", self.image_size, self.in_chans), self.mean, self.std)
        self._dataset = StreamBatches([corrupted[domain] for domain in self.domains], labels, source_index,
                                      stream_domain, stream_position, plain)
        self._segments = segments

    def test_dataloader(self) -> DataLoader:
        if self._dataset is None:
            raise RuntimeError("CorruptionStream.setup('test') must run before test_dataloader()")
        world_size, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        batches = self._global_batches(self._segments, world_size)
        on_cuda = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        return DataLoader(
            self._dataset, batch_size=None, sampler=StreamSampler(batches, world_size, rank),
            num_workers=self.num_workers, pin_memory=self.pin_memory if self.pin_memory is not None else on_cuda,
        )

    # Internals.

    def _clean_images(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The selected test images at image_size (uint8 N x C x S x S), their labels and source indices."""
        test_split = self.source.raw_images("val")  # the split the source's test_dataloader serves
        total = len(test_split)
        if self.num_samples is None or self.num_samples >= total:
            selection = np.arange(total)
        else:
            rng = np.random.default_rng(derived_seed(self.seed, "num_samples"))
            selection = np.sort(rng.choice(total, self.num_samples, replace=False))
        loaded = ImagesInMemory(Subset(test_split, selection.tolist()), self.image_size, self.num_workers)
        return loaded.images, loaded.labels.long(), torch.from_numpy(selection)

    @staticmethod
    def _fingerprint(images: torch.Tensor) -> str:
        digest = hashlib.sha256(str(tuple(images.shape)).encode())
        digest.update(images.contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    def cache_path(self, fingerprint: str, name: str, severity: int) -> Path:
        folder = f"{type(self.source).__name__.lower()}-{fingerprint}"
        file = f"{name}-s{severity}-seed{self.seed}-{self.constants_family}-v{CACHE_VERSION}.npz"
        return self.cache_dir / folder / file

    def _corrupted(self, images: torch.Tensor, fingerprint: str, name: str, severity: int) -> torch.Tensor:
        path = self.cache_path(fingerprint, name, severity)
        meta = {"fingerprint": fingerprint, "corruption": name, "severity": severity, "seed": self.seed,
                "constants": self.constants_family, "version": CACHE_VERSION}
        cached = self._read_cache(path, meta, images.shape)
        if cached is not None:
            return cached
        rank_zero_info(f"CorruptionStream: generating {name} severity {severity} for {len(images)} images -> {path}")
        out = torch.empty_like(images)
        chunk = max(1, CHUNK_PIXELS // images[0].numel())
        for part, start in enumerate(range(0, len(images), chunk)):
            seed = derived_seed(self.seed, name, severity, part)
            part_images = images[start : start + chunk]
            out[start : start + chunk] = corrupt(part_images, name, severity, seed, self.constants_family)
        _write_atomically(path, out, meta)
        return out

    @staticmethod
    def _read_cache(path: Path, meta: dict, shape: torch.Size) -> torch.Tensor | None:
        if not path.is_file():
            return None
        try:
            with np.load(path) as stored:
                found = {key: stored[key].item() for key in meta}
                images = stored["images"]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
            rank_zero_warn(f"CorruptionStream: cache file {path} is unreadable ({error}); generating it again")
            return None
        if found != meta or tuple(images.shape) != tuple(shape) or images.dtype != np.uint8:
            rank_zero_warn(f"CorruptionStream: cache file {path} holds {found}, {images.dtype} {images.shape}, not "
                           f"{meta} {tuple(shape)}; generating it again")
            return None
        return torch.from_numpy(images)

    def _stream_order(
        self, count: int, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
        """(domain, image position) per stream step, and the stream's segments as (start, end):
        one per domain, or a single one under mixed_domains."""
        if self.protocol == "correlated":
            rng = np.random.default_rng(derived_seed(self.seed, "dirichlet"))
            order = dirichlet_label_order(labels.numpy(), self.dirichlet_delta, rng)
        else:
            order = np.random.default_rng(derived_seed(self.seed, "order")).permutation(count)
        num_domains = len(self.domains)
        domain = np.repeat(np.arange(num_domains), count)
        position = np.tile(order, num_domains)
        if self.protocol == "mixed_domains":
            mix = np.random.default_rng(derived_seed(self.seed, "mixed")).permutation(len(domain))
            domain, position = domain[mix], np.tile(np.arange(count), num_domains)[mix]
            segments = [(0, len(domain))]
        else:
            segments = [(d * count, (d + 1) * count) for d in range(num_domains)]
        return torch.from_numpy(domain).long(), torch.from_numpy(position).long(), segments

    def _global_batches(self, segments: list[tuple[int, int]], world_size: int) -> list[tuple[int, int, bool]]:
        """Stream slices of batch_size x world_size images, never across a segment; ``reset`` on the
        first of each segment under reset_each_shift."""
        step = self.batch_size * world_size
        batches = []
        for start, end in segments:
            for first in range(start, end, step):
                size = min(step, end - first)
                if size < world_size:
                    raise ValueError(
                        f"a domain ends in a batch of {size} images, fewer than the {world_size} processes that "
                        "share it: choose num_samples (images per domain) so that its remainder modulo "
                        f"batch_size x processes ({step}) is 0 or at least {world_size}"
                    )
                batches.append((first, first + size, self.protocol == "reset_each_shift" and first == start))
        return batches


def _write_atomically(path: Path, images: torch.Tensor, meta: dict) -> None:
    """np.savez into a temporary file beside ``path``, flushed to disk, then renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            np.savez(file, images=images.numpy(), **{key: np.array(value) for key, value in meta.items()})
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
