"""Decoupled contrastive losses DCL and DCLW (Yeh et al., ECCV 2022)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_lightning.distributed import all_reduce_sum, gather, rank
from ssl_lightning.losses._checks import check_paired_rows

#: weights of the positive terms: (u1, u2), the unit-normalised pairs of the global batch, [N', D]
#: each, to one weight per pair, [N'] (both views of pair i share w_i)
WeightFn = Callable[[Tensor, Tensor], Tensor]


def von_mises_fisher_weights(u1: Tensor, u2: Tensor, sigma: float = 0.5) -> Tensor:
    """DCLW's negative von Mises-Fisher weights (Yeh et al. 2022, eq. 7), detached:

        w_i = 2 - exp(sim(i, j) / sigma) / E_m[ exp(sim(m, pos(m)) / sigma) ]
            = 2 - N' softmax_m(sim(m, pos(m)) / sigma)_i

    over the N' pairs of the global batch (counting both views instead doubles numerator and
    denominator alike). Easy pairs (similar views) get w < 1, hard ones w up to 2; the mean is 1.
    Detached as in lightly's DCLWLoss: a weighting scales the positive term and is not itself
    trained (raminnakhli/Decoupled-Contrastive-Learning backpropagates through it).
    """
    positive_similarity = (u1 * u2).sum(dim=1).detach()
    return 2 - u1.shape[0] * torch.softmax(positive_similarity / sigma, dim=0)


def dcl(z1: Tensor, z2: Tensor, temperature: float = 0.1, weight_fn: WeightFn | None = None) -> Tensor:
    """Decoupled contrastive loss (Yeh et al. 2022, DCL, eq. 6): NT-Xent without the positive in the
    denominator.

    With u = z / ||z|| and sim(a, b) = u_a . u_b, for every sample i of the global batch of 2N'
    samples (N' pairs gathered from all ranks, both views) with positive j, the other view:

        l_i = -w_i sim(i, j) / t + log sum_{k not in {i, j}} exp(sim(i, k) / t)

    with w_i = 1 (DCL) or ``weight_fn``'s weight of i's pair (DCLW, see :func:`dclw`); the loss is
    the mean of l_i over the 2N' samples (lightly's DCLLoss; the authors' training script sums the
    two directions, twice this). Without the positive in the denominator the gradient loses NT-Xent's
    negative-positive coupling factor, so small batches and temperatures train as well as large.
    It can be negative. ``temperature`` defaults to 0.1, the paper's value.

    Each rank scores its own 2N samples against the 2N' gathered ones and the per-rank sums are
    all-reduced, so every rank returns the global loss, even for uneven shards.

    Args:
        z1: [N, D] projections of the first views; need not be normalised.
        z2: [N, D] projections of the second views, row i paired with row i of ``z1``.
        temperature: softmax temperature t > 0.
        weight_fn: weights of the positive terms (see ``WeightFn``); None for DCL.

    Returns:
        The scalar loss, in the input dtype, or in float32 for lower-precision inputs.

    Raises:
        ValueError: for bad shapes, t <= 0, or a global batch of one pair (no negatives: the
            denominator is an empty sum).
    """
    check_paired_rows("dcl", z1, z2)
    if temperature <= 0:
        raise ValueError(f"dcl needs temperature > 0, got {temperature}")

    # Half-precision logits and dot products lose too much; autocast would re-lower the matmul.
    dtype = torch.promote_types(z1.dtype, torch.float32)
    with torch.autocast(z1.device.type, enabled=False):
        u1 = F.normalize(z1.to(dtype), dim=1)
        u2 = F.normalize(z2.to(dtype), dim=1)
        n_local = u1.shape[0]
        # One collective for both views; global order is all first views, then all second views.
        pairs = gather(torch.stack([u1, u2], dim=1))
        n_global = pairs.shape[0]  # known on the host: gather exchanged the shard sizes
        if n_global < 2:
            raise ValueError(
                f"dcl needs at least 2 pairs in the global batch, got {n_global}: with one pair there are "
                "no negatives and the denominator is an empty sum. Use a larger batch."
            )
        keys = torch.cat([pairs[:, 0], pairs[:, 1]])

        shard_sizes = gather(torch.tensor([n_local], device=z1.device))
        first_row = shard_sizes[: rank()].sum() + torch.arange(n_local, device=z1.device)
        self_index = torch.cat([first_row, first_row + n_global])
        positive_index = torch.cat([first_row + n_global, first_row])

        queries = torch.cat([u1, u2])
        logits = queries @ keys.T / temperature
        rows = torch.arange(2 * n_local, device=z1.device)
        decoupled = torch.zeros_like(logits, dtype=torch.bool)
        decoupled[rows, self_index] = True
        decoupled[rows, positive_index] = True
        negative_terms = torch.logsumexp(logits.masked_fill(decoupled, float("-inf")), dim=1)
        positive_terms = logits[rows, positive_index]
        if weight_fn is not None:
            weights = weight_fn(pairs[:, 0], pairs[:, 1])
            positive_terms = positive_terms * torch.cat([weights[first_row], weights[first_row]])
        local_sum = (negative_terms - positive_terms).sum()
        return all_reduce_sum(local_sum) / (2 * n_global)


def dclw(z1: Tensor, z2: Tensor, temperature: float = 0.1, sigma: float = 0.5) -> Tensor:
    """DCL with the negative von Mises-Fisher weighting (Yeh et al. 2022, DCLW, eqs. 6-7):
    :func:`dcl` with w_i = 2 - N' softmax_m(sim(m, pos(m)) / sigma)_i over the global batch's
    N' pairs, detached (:func:`von_mises_fisher_weights`). Paper defaults t = 0.1, sigma = 0.5.
    As sigma grows every w_i tends to 1 and DCLW to DCL.

    Args:
        z1, z2: [N, D] paired projections, as for :func:`dcl`.
        temperature: softmax temperature t > 0.
        sigma: scale sigma > 0 of the weights' softmax.
    """
    if sigma <= 0:
        raise ValueError(f"dclw needs sigma > 0, got {sigma}")
    return dcl(z1, z2, temperature, weight_fn=partial(von_mises_fisher_weights, sigma=sigma))
