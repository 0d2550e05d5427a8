"""InfoNCE against a queue of negatives, the contrastive loss of MoCo (and of MoCHi, with extra negatives)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_lightning.distributed import all_reduce_sum
from ssl_lightning.losses._checks import check_paired_rows


def info_nce_with_queue(
    query: Tensor,
    key: Tensor,
    negatives: Tensor,
    temperature: float = 0.2,
    extra_negatives: Tensor | None = None,
) -> Tensor:
    """MoCo's InfoNCE (He et al., CVPR 2020, eq. 1; MoCo v2, Chen et al. 2020, temperature 0.2).

    With q = query / ||query||, k+ = key / ||key|| and the queued negatives k_1 .. k_K, for every
    query i:

        l_i = -log( exp(q_i . k+_i / t) / ( exp(q_i . k+_i / t) + sum_j exp(q_i . k_j / t) ) )

    i.e. a (1 + K)-way cross-entropy whose positive is logit 0; the loss is the mean of l_i over the
    global batch. MoCHi (Kalantidis et al. 2020) adds per-query negatives h_{i,1} .. h_{i,S} to the
    denominator: ``extra_negatives``.

    Negatives are used as given: they must already be unit vectors (the queue holds normalised
    keys, MoCHi's mixtures are normalised), so a 65,536-row queue is not re-normalised every step.
    They are constants of the loss in MoCo (a snapshot of the queue, detached mixtures); a gradient
    flows into them only if the caller passes tensors that require one.

    The queue is the same on every rank, so each rank scores its own queries alone; the per-rank
    sums are all-reduced and divided by the global number of queries, so every rank returns the
    global-batch mean, also for uneven shards (see ``ssl_lightning.distributed`` for the gradient
    convention).

    Args:
        query: [N, D] query-encoder projections; need not be normalised.
        key: [N, D] key-encoder projections of the other view, row i the positive of query i;
            need not be normalised.
        negatives: [K, D] unit-norm negatives shared by every query (MoCo's queue).
        temperature: softmax temperature t > 0 (MoCo v2: 0.2).
        extra_negatives: optional [N, S, D] unit-norm negatives of each query (MoCHi's synthetic ones).

    Returns:
        The scalar loss, in the input dtype, or in float32 for lower-precision inputs.
    """
    check_paired_rows("info_nce_with_queue", query, key, names=("query", "key"))
    dim = query.shape[1]
    if negatives.dim() != 2 or negatives.shape[1] != dim:
        raise ValueError(
            f"info_nce_with_queue expects negatives of shape [K, {dim}] (the queue, as wide as the queries), "
            f"got {tuple(negatives.shape)}"
        )
    if extra_negatives is not None and (extra_negatives.dim() != 3 or extra_negatives.shape[::2] != (query.shape[0], dim)):
        raise ValueError(
            f"info_nce_with_queue expects extra_negatives of shape [{query.shape[0]}, S, {dim}] (S negatives per "
            f"query), got {tuple(extra_negatives.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"info_nce_with_queue needs temperature > 0, got {temperature}")

    # Half-precision logits lose too much at t = 0.2; autocast would re-lower the matmul.
    dtype = torch.promote_types(query.dtype, torch.float32)
    with torch.autocast(query.device.type, enabled=False):
        q = F.normalize(query.to(dtype), dim=1)
        k = F.normalize(key.to(dtype), dim=1)
        logits = [(q * k).sum(dim=1, keepdim=True), q @ negatives.to(dtype).T]
        if extra_negatives is not None:
            logits.append(torch.einsum("nd,nsd->ns", q, extra_negatives.to(dtype)))
        logits = torch.cat(logits, dim=1) / temperature
        positive = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        local_sum = F.cross_entropy(logits, positive, reduction="sum")
        global_count = all_reduce_sum(q.new_full((), q.shape[0]))  # a fill kernel: no host-to-device copy
        return all_reduce_sum(local_sum) / global_count
