"""NT-Xent, the contrastive loss of SimCLR."""

import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_lightning.distributed import all_reduce_sum, gather, rank
from ssl_lightning.losses._checks import check_paired_rows


def nt_xent(z1: Tensor, z2: Tensor, temperature: float = 0.1) -> Tensor:
    """Normalised temperature-scaled cross-entropy (Chen et al. 2020, SimCLR, eq. 1).

    With u = z / ||z|| and sim(a, b) = u_a . u_b, for every sample i of the global batch of
    2N' samples (N' image pairs gathered from all ranks, both views) with positive j, the other
    view of the same image:

        l_i = -log( exp(sim(i, j) / t) / sum_{k != i} exp(sim(i, k) / t) )

    and the loss is the mean of l_i over all 2N' samples. The negatives of i are the other
    2N' - 2 samples. ``temperature`` defaults to 0.1, SimCLR's value for its large-batch runs.

    Each rank scores only its own 2N samples (as queries) against the 2N' gathered samples (as
    keys); the per-rank sums are then all-reduced, so every rank returns the global loss, even
    for uneven shards (see ``ssl_lightning.distributed`` for the gradient convention).

    Args:
        z1: [N, D] projections of the first views; need not be normalised.
        z2: [N, D] projections of the second views, row i paired with row i of ``z1``.
        temperature: softmax temperature t > 0.

    Returns:
        The scalar loss, in the input dtype, or in float32 for lower-precision inputs.
    """
    check_paired_rows("nt_xent", z1, z2)
    if temperature <= 0:
        raise ValueError(f"nt_xent needs temperature > 0, got {temperature}")

    # Half-precision logits and dot products lose too much; autocast would re-lower the matmul.
    dtype = torch.promote_types(z1.dtype, torch.float32)
    with torch.autocast(z1.device.type, enabled=False):
        u1 = F.normalize(z1.to(dtype), dim=1)
        u2 = F.normalize(z2.to(dtype), dim=1)
        n_local = u1.shape[0]
        # One collective for both views; global order is all first views, then all second views.
        pairs = gather(torch.stack([u1, u2], dim=1))
        n_global = pairs.shape[0]
        keys = torch.cat([pairs[:, 0], pairs[:, 1]])

        shard_sizes = gather(torch.tensor([n_local], device=z1.device))
        first_row = shard_sizes[: rank()].sum() + torch.arange(n_local, device=z1.device)
        self_index = torch.cat([first_row, first_row + n_global])
        positive_index = torch.cat([first_row + n_global, first_row])

        logits = torch.cat([u1, u2]) @ keys.T / temperature
        is_self = torch.zeros_like(logits, dtype=torch.bool)
        is_self[torch.arange(2 * n_local, device=z1.device), self_index] = True
        logits = logits.masked_fill(is_self, float("-inf"))
        local_sum = F.cross_entropy(logits, positive_index, reduction="sum")
        return all_reduce_sum(local_sum) / (2 * n_global)
