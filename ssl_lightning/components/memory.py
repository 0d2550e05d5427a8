"""State that outlives a step: ``FeatureQueue`` (the last K embeddings of the global batch) and
``IndexedMemory`` (one entry per training image, keyed by ``batch["index"]``).

Both are buffers of an ``nn.Module`` the method owns, so they are saved in and restored from its
checkpoint (an exact resume reproduces them bit for bit), and both are written with what every
rank gathered, so all ranks hold the same state. Writes read nothing back to the host: positions
are computed on the device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_lightning.distributed import gather_equal_shards


class FeatureQueue(nn.Module):
    """A first-in, first-out queue of the last ``size`` embeddings (MoCo's negatives, NNCLR's
    support set, MoCHi's hard negatives).

    It starts filled with random unit vectors, as MoCo's and solo-learn's queues do, so it is
    usable from the first step; :meth:`push` replaces the oldest rows with the keys of the
    global batch (gathered from every rank, in rank order). A step reads :meth:`snapshot` for its
    loss, then pushes its keys (MoCo's order: this batch's keys are not its own negatives). The method checks at setup that the
    queue fits its data (:meth:`check_fits`): a size that the global batch does not divide would
    make the FIFO wrap in the middle of a batch.

    Args:
        size: number of embeddings held (K).
        dim: embedding width.
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"FeatureQueue needs size >= 1 and dim >= 1, got size={size}, dim={dim}")
        self.register_buffer("features", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("position", torch.zeros((), dtype=torch.long))  # the next row to overwrite

    @property
    def size(self) -> int:
        return self.features.shape[0]

    def check_fits(self, global_batch: int, num_train_images: int | None, owner: str = "queue") -> None:
        """Refuse a queue the global batch does not divide, or one larger than the training set."""
        if self.size % global_batch:
            raise ValueError(
                f"{owner}: the queue size {self.size} is not divisible by the global batch {global_batch} "
                f"(batch size x processes). Choose a multiple of {global_batch}, e.g. "
                f"{max(1, self.size // global_batch) * global_batch}."
            )
        if num_train_images is not None and self.size > num_train_images:
            raise ValueError(
                f"{owner}: the queue size {self.size} is larger than the training set ({num_train_images} images): "
                "it would hold stale copies of the same images. Choose a smaller queue."
            )

    def snapshot(self) -> Tensor:
        """The queued embeddings as they are now, as a copy: a loss built on ``features`` itself
        would fail in backward once :meth:`push` has overwritten rows autograd saved."""
        return self.features.clone()

    @torch.no_grad()
    def push(self, keys: Tensor) -> None:
        """Enqueue this step's ``[N, dim]`` keys from every rank, dropping the oldest rows."""
        keys = gather_equal_shards(keys).to(self.features.dtype)
        if keys.shape[0] > self.size:
            raise ValueError(f"Cannot push {keys.shape[0]} keys into a queue of {self.size}: enlarge the queue.")
        rows = (self.position + torch.arange(keys.shape[0], device=keys.device)) % self.size
        self.features.index_copy_(0, rows, keys)
        self.position.add_(keys.shape[0]).remainder_(self.size)


class IndexedMemory(nn.Module):
    """One entry of per-sample state for each training image, addressed by ``batch["index"]``
    (iSogCLR's moving estimates of each anchor's partition term, PS-KD's past predictions).

    :meth:`write` takes the indices and values of every rank (gathered), so all ranks hold the
    same memory. An image written more than once in one global batch (a sampler that repeats
    images to even out the shards) gets the mean of its writes, whatever their order.

    Every read and write checks its indices against the size with an assertion the device
    evaluates (no read-back to the host); the size comes from the DataModule
    (``num_train_images``), so a correct DataModule never exceeds it.

    Args:
        size: number of training images.
        shape: shape of one image's entry (``()`` for a scalar).
        fill: the value of entries never written.
    """

    def __init__(self, size: int, shape: tuple[int, ...] = (), fill: float = 0.0):
        super().__init__()
        if size < 1:
            raise ValueError(f"IndexedMemory needs size >= 1 (the number of training images), got {size}")
        self.register_buffer("values", torch.full((size, *shape), float(fill)))

    @property
    def size(self) -> int:
        return self.values.shape[0]

    def read(self, index: Tensor) -> Tensor:
        """The entries of these images, ``[N, *shape]``."""
        self._check_range(index)
        return self.values[index]

    @torch.no_grad()
    def write(self, index: Tensor, values: Tensor) -> None:
        """Store every rank's ``values`` (``[N, *shape]``) at its ``index`` (``[N]``)."""
        if values.shape != (index.shape[0], *self.values.shape[1:]):
            raise ValueError(
                f"IndexedMemory.write: values of shape {tuple(values.shape)} for {index.shape[0]} indices; "
                f"expected {(index.shape[0], *self.values.shape[1:])}"
            )
        index, values = gather_equal_shards(index), gather_equal_shards(values).to(self.values.dtype)
        self._check_range(index)
        # Broadcast each row's index over the entry's shape: scatter indexes element by element.
        where = index.view(-1, *([1] * (values.dim() - 1))).expand_as(values)
        self.values.scatter_reduce_(0, where, values, reduce="mean", include_self=False)

    def _check_range(self, index: Tensor) -> None:
        if index.is_floating_point() or index.dim() != 1:
            raise TypeError(f"IndexedMemory needs a 1-d integer index (batch['index']), got {index.dtype} "
                            f"of shape {tuple(index.shape)}")
        # An assertion the device evaluates: the host does not wait for it (on a GPU it surfaces
        # at the next sync as a device-side assert carrying this message; on the CPU it raises here).
        in_range = ((index >= 0) & (index < self.size)).all()
        torch._assert_async(in_range, (
            f"IndexedMemory of {self.size} images got an index outside 0..{self.size - 1}: batch['index'] must be "
            "the image's position in the training set. A DataModule whose dataset length differs from "
            "num_train_images, or a custom loader without ssl_lightning's 'index', does this."
        ))
