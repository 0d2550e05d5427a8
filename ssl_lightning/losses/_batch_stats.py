"""Statistics over the global batch that several losses share (Barlow Twins, VICReg, Mixed Barlow Twins)."""

from __future__ import annotations

import torch
from torch import Tensor

from ssl_lightning.distributed import all_reduce_sum


def centre_over_global_batch(*embeddings: Tensor) -> tuple[list[Tensor], Tensor]:
    """Each ``[N, D]`` input minus its column means over the global batch (every rank's rows), and
    the global row count as a 0-d tensor. One all-reduce for all inputs and the count, so uneven
    shards weigh each row once and the host never waits for a count; the gradient follows
    ``ssl_lightning.distributed``'s convention."""
    dim = embeddings[0].shape[1]
    count = embeddings[0].new_tensor([embeddings[0].shape[0]])
    sums = all_reduce_sum(torch.cat([*(z.sum(dim=0) for z in embeddings), count]))
    n_global = sums[-1]
    centred = [z - sums[i * dim : (i + 1) * dim] / n_global for i, z in enumerate(embeddings)]
    return centred, n_global


def check_two_rows_per_process(loss: str, z: Tensor, purpose: str) -> None:
    """Batch statistics need two rows on every process; checked per process (not globally) so
    that no rank has to wait for a count."""
    if z.shape[0] < 2:
        raise ValueError(f"{loss} needs at least 2 samples per process {purpose}, got shape {tuple(z.shape)}")
