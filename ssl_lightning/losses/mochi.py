"""MoCHi's synthetic hard negatives: mixtures of each query's hardest queued negatives."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def mix_hard_negatives(
    query: Tensor,
    negatives: Tensor,
    num_hardest: int = 1024,
    num_mixed: int = 1024,
    num_query_mixed: int = 256,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Hard negative mixing (Kalantidis et al., NeurIPS 2020, "Hard Negative Mixing for Contrastive
    Learning", section 4, eqs. 3-4).

    For each query q (normalised here), its negatives are sorted by similarity q . n and the
    ``num_hardest`` (N) most similar kept: Q~ = {n~_1, .., n~_N}. From them:

    * ``num_mixed`` (s) mixtures of two hardest negatives,
      ``h = h~ / ||h~||`` with ``h~ = a n~_i + (1 - a) n~_j``, i, j drawn uniformly from 1..N and a ~ U(0, 1);
    * ``num_query_mixed`` (s') mixtures of the query with one hardest negative,
      ``h' = h~' / ||h~'||`` with ``h~' = b q + (1 - b) n~_j``, j uniform and b ~ U(0, 0.5), so that
      the negative's share is larger than the query's and h' stays a negative.

    The paper's ImageNet-100 setting MoCHi (1024, 1024, 256) is the default. The result carries no
    gradient (neither into the query nor the queue) and is never enqueued: it is an extra set of
    per-query negatives for :func:`ssl_lightning.losses.moco.info_nce_with_queue`.

    Random draws, in this order, from ``generator`` (or the global RNG on the query's device): the
    pair indices ``[N, s, 2]``, a ``[N, s, 1]``, the query-mix indices ``[N, s']``, b ``[N, s', 1]``.
    Everything runs on the device: no value is read back to the host.

    Args:
        query: [B, D] queries; need not be normalised.
        negatives: [K, D] unit-norm negatives (the queue), K >= ``num_hardest``.
        num_hardest: N, the hardest negatives per query the mixtures draw from.
        num_mixed: s, mixtures of two hard negatives per query.
        num_query_mixed: s', mixtures of the query and a hard negative per query.
        generator: source of the random draws, on the query's device.

    Returns:
        [B, s + s', D] unit-norm synthetic negatives (the s mixtures first), in float32 or wider.
    """
    if negatives.dim() != 2 or query.dim() != 2 or negatives.shape[1] != query.shape[1]:
        raise ValueError(
            f"mix_hard_negatives expects query [B, D] and negatives [K, D] of the same width, "
            f"got {tuple(query.shape)} and {tuple(negatives.shape)}"
        )
    if not 1 <= num_hardest <= negatives.shape[0]:
        raise ValueError(
            f"mix_hard_negatives needs 1 <= num_hardest <= the {negatives.shape[0]} negatives, got num_hardest="
            f"{num_hardest}: lower num_hardest or enlarge the queue"
        )
    if num_mixed < 0 or num_query_mixed < 0:
        raise ValueError(f"mix_hard_negatives needs num_mixed, num_query_mixed >= 0, got {num_mixed}, {num_query_mixed}")

    dtype = torch.promote_types(query.dtype, torch.float32)
    device, batch = query.device, query.shape[0]
    with torch.autocast(device.type, enabled=False):
        q = F.normalize(query.to(dtype), dim=1)
        negatives = negatives.to(dtype)
        hardest = (q @ negatives.T).topk(num_hardest, dim=1).indices  # [B, N] queue rows, hardest first

        def pick(positions: Tensor) -> Tensor:
            """The queued negatives at these positions of each query's hardest list: [B, M, ...] -> [B, M, ..., D]."""
            rows = hardest.gather(1, positions.flatten(1)).view_as(positions)
            return negatives[rows]

        pairs = pick(torch.randint(num_hardest, (batch, num_mixed, 2), generator=generator, device=device))
        a = torch.rand(batch, num_mixed, 1, generator=generator, device=device, dtype=dtype)
        mixed = a * pairs[:, :, 0] + (1 - a) * pairs[:, :, 1]

        partners = pick(torch.randint(num_hardest, (batch, num_query_mixed), generator=generator, device=device))
        b = 0.5 * torch.rand(batch, num_query_mixed, 1, generator=generator, device=device, dtype=dtype)
        query_mixed = b * q[:, None] + (1 - b) * partners

        return F.normalize(torch.cat([mixed, query_mixed], dim=1), dim=2)
