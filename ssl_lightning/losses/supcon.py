"""Supervised contrastive loss SupCon (Khosla et al., NeurIPS 2020)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_lightning.distributed import all_reduce_sum, gather, rank
from ssl_lightning.losses._checks import check_paired_rows


def supcon(z1: Tensor, z2: Tensor, labels: Tensor, temperature: float = 0.1) -> Tensor:
    """Supervised contrastive loss, L_out (Khosla et al. 2020, SupCon, eq. 2).

    With u = z / ||z|| and sim(a, b) = u_a . u_b, every sample i of the global batch of 2N'
    samples (N' pairs gathered from all ranks, both views) is an anchor, with positives P(i): the
    other view of its own image, and every other sample with the same label. Then

        l_i = -1/|P(i)| sum_{p in P(i)} log( exp(sim(i, p) / t) / sum_{k != i} exp(sim(i, k) / t) )

    and the loss is the mean of l_i over the 2N' anchors. Label -1 (unlabelled) matches nothing,
    not even another -1: such a sample's only positive is its other view, so a batch without labels
    gives exactly SimCLR's NT-Xent. ``temperature`` defaults to 0.1, the paper's value. The official
    code also multiplies the loss by t / base_t (base_t = 0.07), a constant learning-rate factor;
    this function leaves it out (base_t = t), as eq. 2 does.

    Each rank scores its own 2N samples against the 2N' gathered ones and the per-rank sums are
    all-reduced, so every rank returns the global loss, even for uneven shards.

    Args:
        z1: [N, D] projections of the first views; need not be normalised.
        z2: [N, D] projections of the second views, row i paired with row i of ``z1``.
        labels: [N] integer class of each image, -1 when unlabelled.
        temperature: softmax temperature t > 0.

    Returns:
        The scalar loss, in the input dtype, or in float32 for lower-precision inputs.
    """
    check_paired_rows("supcon", z1, z2)
    if labels.shape != z1.shape[:1] or labels.is_floating_point() or labels.is_complex():
        raise ValueError(
            f"supcon expects labels as an integer tensor of shape [N] = {tuple(z1.shape[:1])}, one class per "
            f"image (-1: unlabelled), got {labels.dtype} of shape {tuple(labels.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"supcon needs temperature > 0, got {temperature}")

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
        all_labels = gather(labels.long())
        key_labels = torch.cat([all_labels, all_labels])
        query_labels = torch.cat([labels, labels]).long()

        shard_sizes = gather(torch.tensor([n_local], device=z1.device))
        first_row = shard_sizes[: rank()].sum() + torch.arange(n_local, device=z1.device)
        self_index = torch.cat([first_row, first_row + n_global])
        positive_index = torch.cat([first_row + n_global, first_row])

        rows = torch.arange(2 * n_local, device=z1.device)
        is_self = torch.zeros(2 * n_local, 2 * n_global, dtype=torch.bool, device=z1.device)
        is_self[rows, self_index] = True
        same_class = (query_labels[:, None] == key_labels[None, :]) & (query_labels[:, None] >= 0)
        positive = same_class & ~is_self
        positive[rows, positive_index] = True

        logits = torch.cat([u1, u2]) @ keys.T / temperature
        log_prob = torch.log_softmax(logits.masked_fill(is_self, float("-inf")), dim=1)
        # Zero, not select: no boolean indexing (host sync), and 0 * -inf at self would be NaN.
        positive_log_prob = log_prob.masked_fill(~positive, 0.0).sum(dim=1)
        local_sum = -(positive_log_prob / positive.sum(dim=1)).sum()
        return all_reduce_sum(local_sum) / (2 * n_global)
