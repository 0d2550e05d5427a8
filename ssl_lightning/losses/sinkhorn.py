"""Sinkhorn-Knopp: balanced soft assignments of a global batch to prototypes (SwAV's codes)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ssl_lightning.distributed import all_reduce_sum, world_size


@torch.no_grad()
def sinkhorn_knopp(scores: Tensor, epsilon: float = 0.05, iterations: int = 3) -> Tensor:
    """Equipartitioned soft assignments of samples to prototypes (Caron et al. 2020, SwAV, eq. 3-4).

    With C the prototypes and Z the samples, SwAV looks for the codes Q in the transportation
    polytope, every prototype taking an equal share of the B samples of the global batch:

        max_Q  Tr(Q^T C^T Z) + epsilon H(Q)   s.t.  Q 1_B = 1_K / K,  Q^T 1_K = 1_B / B

    whose solution is Diag(u) exp(C^T Z / epsilon) Diag(v). ``iterations`` rounds of Sinkhorn-Knopp
    find u and v by rescaling, in turn, the rows of Q (prototypes, to total 1/K) and its columns
    (samples, to total 1/B), after scaling Q to total 1. The columns are rescaled last, so each
    sample's code is exactly a distribution; the prototypes' totals are balanced only as far as the
    iterations get. The codes are returned times B, one distribution per sample, as the official
    ``distributed_sinkhorn``.

    The batch is the global one: the sums over samples (Q's total and its row sums) are
    all-reduced over the ranks, so each rank gets its own rows of what one process computes on the
    concatenated scores, even for uneven shards. The result is a target: no gradient flows through
    it. It is computed in float32 (float64 stays float64), autocast off, after subtracting the
    global maximum score: a factor common to every entry, which the first normalisation removes, so
    that exp cannot overflow for small epsilon (DINOv2's temperatures) or unbounded scores.

    Args:
        scores: [N, K] scores of this rank's N samples against K prototypes (SwAV: cosine
            similarities of normalised projections with unit-norm prototypes).
        epsilon: entropy regularisation; smaller gives harder codes.
        iterations: rounds of row and column rescaling (SwAV uses 3).

    Returns:
        [N, K] codes, each row a distribution over the prototypes.
    """
    if scores.dim() != 2 or scores.shape[1] < 1:
        raise ValueError(
            f"sinkhorn_knopp expects scores of shape [N, K] (samples x prototypes), got {tuple(scores.shape)}"
        )
    if epsilon <= 0:
        raise ValueError(f"sinkhorn_knopp needs epsilon > 0, got {epsilon}")
    if iterations < 1:
        raise ValueError(f"sinkhorn_knopp needs at least one iteration, got {iterations}")

    dtype = torch.promote_types(scores.dtype, torch.float32)
    with torch.autocast(scores.device.type, enabled=False):
        scores = scores.to(dtype)
        num_prototypes = scores.shape[1]
        num_samples = all_reduce_sum(torch.tensor(float(scores.shape[0]), dtype=dtype, device=scores.device))
        q = torch.exp((scores - _global_max(scores)) / epsilon).T  # [K, N]: the paper's orientation
        q /= all_reduce_sum(q.sum())
        for _ in range(iterations):
            q /= all_reduce_sum(q.sum(dim=1, keepdim=True)) * num_prototypes  # every prototype: 1/K
            q /= q.sum(dim=0, keepdim=True) * num_samples  # every sample: 1/B (a sample lives on one rank)
        return (q * num_samples).T


def _global_max(x: Tensor) -> Tensor:
    """The largest entry over every rank's ``x`` (a 0-d tensor; an empty shard contributes -inf)."""
    local = x.max() if x.numel() else x.new_tensor(float("-inf"))
    if world_size() > 1:
        local = local.clone()
        dist.all_reduce(local, op=dist.ReduceOp.MAX)
    return local
