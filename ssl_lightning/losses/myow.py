"""MYOW's mined views: each sample's nearest other sample of the global batch, and the across-sample
regression onto it."""

import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_lightning.distributed import gather, rank
from ssl_lightning.losses.byol import normalized_regression


@torch.no_grad()
def mine_views(query: Tensor, pool: Tensor, k: int = 1, self_index: Tensor | None = None) -> Tensor:
    """For each query, one of its ``k`` nearest pool rows by cosine similarity, drawn uniformly
    (Azabou et al. 2021, MYOW, "mining views"; the official ``MYOW._knn`` of nerdslab/myow: ``topk``
    of ``2 - 2 cos(q, c)``, then ``randint(k)`` among them).

    ``self_index[i]`` is the pool row that holds query i's own image: it is never chosen, so the
    mined view is always another sample. The lookup and the draw run on the device (no host sync),
    in float32 whatever the input dtype, so that mixed precision does not change the neighbours.

    Args:
        query: [N, D] representations of the anchors (MYOW: the online encoder's).
        pool: [M, D] candidate representations (MYOW: the target encoder's).
        k: neighbours to draw from (the official ``view_miner_k``).
        self_index: [N] pool row of each query's own image, or None when the pool holds other images only.

    Returns:
        [N] indices into ``pool`` (int64).
    """
    if query.dim() != 2 or pool.dim() != 2 or query.shape[1] != pool.shape[1]:
        raise ValueError(
            f"mine_views expects query [N, D] and pool [M, D] of the same width D, "
            f"got {tuple(query.shape)} and {tuple(pool.shape)}"
        )
    candidates = pool.shape[0] - (0 if self_index is None else 1)
    if not 1 <= k <= candidates:
        raise ValueError(
            f"mine_views draws from the k={k} nearest of {candidates} candidates (the pool less the sample itself): "
            f"need 1 <= k <= {candidates}. Lower k or enlarge the (global) batch."
        )
    dtype = torch.promote_types(torch.promote_types(query.dtype, pool.dtype), torch.float32)
    with torch.autocast(query.device.type, enabled=False):
        similarity = F.normalize(query.to(dtype), dim=1) @ F.normalize(pool.to(dtype), dim=1).T
        if self_index is not None:
            similarity = similarity.scatter(1, self_index.view(-1, 1), float("-inf"))
        nearest = similarity.topk(k, dim=1).indices
        choice = torch.randint(k, (query.shape[0], 1), device=query.device)
        return nearest.gather(1, choice).squeeze(1)


def mined_view_loss(prediction: Tensor, query: Tensor, pool_keys: Tensor, pool_targets: Tensor, k: int = 1) -> Tensor:
    """MYOW's across-sample loss (Azabou et al. 2021; ``MYOWTrainer.train_epoch`` of nerdslab/myow):
    the online prediction of each sample regresses the target projection of a view mined from the
    other samples of the global batch,

        L_m = mean_i || q_m(x_i) / ||q_m(x_i)|| - v'(x_{n(i)}) / ||v'(x_{n(i)})|| ||^2,
        n(i) = one of the k nearest neighbours of y(x_i) among { y'(x_j) : j != i } (cosine),

    with y / y' the online / target encoder, q_m the online cascade projector -> projector_m ->
    predictor_m, and v' the target cascade projector -> projector_m (the official
    ``DoubleBYOL(layout="cascaded")``). The pool is the global batch (gathered from every rank);
    each sample's own row is excluded. Only ``prediction`` gets a gradient: the mined targets are
    the teacher's, and the neighbour choice has none.

    Args:
        prediction: [N, E] online predictions q_m.
        query: [N, D] online encoder representations of the same samples (mining only).
        pool_keys: [N, D] target encoder representations of this rank's samples.
        pool_targets: [N, E] target projections v' of this rank's samples, row-aligned with ``pool_keys``.
        k: neighbours to draw from.

    Returns:
        The scalar loss (global mean), in float32 or wider.
    """
    n_local = query.shape[0]
    if pool_keys.shape[0] != n_local or pool_targets.shape[0] != n_local or prediction.shape[0] != n_local:
        raise ValueError(
            "mined_view_loss expects prediction, query, pool_keys and pool_targets with the same number of rows, "
            f"got {prediction.shape[0]}, {n_local}, {pool_keys.shape[0]} and {pool_targets.shape[0]}"
        )
    keys, targets = gather(pool_keys.detach()), gather(pool_targets.detach())
    shard_sizes = gather(torch.tensor([n_local], device=query.device))
    own_rows = shard_sizes[: rank()].sum() + torch.arange(n_local, device=query.device)
    mined = targets.index_select(0, mine_views(query.detach(), keys, k, self_index=own_rows))
    return normalized_regression(prediction, mined)
