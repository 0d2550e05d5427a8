"""InfoNCE of queries against the keys of the global batch: the loss of MoCo v3 and NNCLR."""

import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_lightning.distributed import all_reduce_sum, gather, rank
from ssl_lightning.losses._checks import check_paired_rows


def batch_info_nce(queries: Tensor, keys: Tensor, temperature: float = 1.0) -> Tensor:
    """InfoNCE with the keys of the global batch as the only candidates (Chen et al. 2021, MoCo v3,
    eq. 1; Dwibedi et al. 2021, NNCLR, eq. 2).

    With u = q / ||q|| and v = k / ||k||, for every query i of the global batch of N' rows
    (gathered from all ranks, in rank order), whose positive is key i:

        l_i = -log( exp(u_i . v_i / t) / sum_{j=1}^{N'} exp(u_i . v_j / t) )

    and the loss is the mean of l_i over the N' queries. Unlike NT-Xent there is no self-similarity
    to exclude: queries and keys come from different sides (the online predictor and the momentum
    encoder in MoCo v3, support-set neighbours and predictions in NNCLR).

    Each rank scores only its own queries against the N' gathered keys; the per-rank sums are
    all-reduced, so every rank returns the global loss, also for uneven shards. Gradients reach
    the keys of every rank through the autograd-aware gather (``ssl_lightning.distributed``);
    keys without gradient (MoCo v3's momentum encoder) simply get none.

    The methods scale or average it themselves: MoCo v3 multiplies it by 2t (the official code's
    ``CrossEntropyLoss()(logits, labels) * (2 * T)``), NNCLR halves each direction.

    Args:
        queries: [N, D] query embeddings; need not be normalised.
        keys: [N, D] key embeddings, row i the positive of query i; need not be normalised.
        temperature: softmax temperature t > 0 (MoCo v3: 1.0 for ResNets, 0.2 for ViTs; NNCLR: 0.1).

    Returns:
        The scalar loss, in the input dtype, or in float32 for lower-precision inputs.
    """
    check_paired_rows("batch_info_nce", queries, keys, names=("queries", "keys"))
    if temperature <= 0:
        raise ValueError(f"batch_info_nce needs temperature > 0, got {temperature}")

    # Half-precision logits and dot products lose too much; autocast would re-lower the matmul.
    dtype = torch.promote_types(queries.dtype, torch.float32)
    with torch.autocast(queries.device.type, enabled=False):
        u = F.normalize(queries.to(dtype), dim=1)
        v = gather(F.normalize(keys.to(dtype), dim=1))
        n_local = u.shape[0]
        # Where this rank's rows start in the global batch, computed on the device (no host sync).
        shard_sizes = gather(torch.tensor([n_local], device=u.device))
        positive_index = shard_sizes[: rank()].sum() + torch.arange(n_local, device=u.device)
        logits = u @ v.T / temperature
        local_sum = F.cross_entropy(logits, positive_index, reduction="sum")
        return all_reduce_sum(local_sum) / v.shape[0]
