"""Barlow Twins' redundancy-reduction loss."""

import torch
from torch import Tensor

from ssl_lightning.distributed import all_reduce_sum
from ssl_lightning.losses._batch_stats import centre_over_global_batch, check_two_rows_per_process
from ssl_lightning.losses._checks import check_paired_rows


def barlow_twins(z1: Tensor, z2: Tensor, lambda_offdiag: float = 5e-3, eps: float = 1e-5) -> Tensor:
    """Redundancy-reduction loss of Barlow Twins (Zbontar et al. 2021, eq. 1 and 2).

    Each of z1, z2 is standardised per dimension over the global batch of N' samples (all
    ranks), as ``BatchNorm1d(affine=False)`` in training mode does in the official repository
    (biased variance, ``eps`` inside the square root):

        zn[b, i] = (z[b, i] - mean_i) / sqrt(var_i + eps)
        C[i, j]  = sum_b zn1[b, i] zn2[b, j] / N'
        L        = sum_i (1 - C[i, i])^2 + lambda * sum_{i != j} C[i, j]^2

    ``lambda_offdiag`` defaults to the paper's 5e-3 (tuned for D = 8192).

    Distributed: only per-dimension sums and the D x D matrix of centred cross-products are
    all-reduced (two collectives), never the batch itself; every rank returns the global loss
    (see ``ssl_lightning.distributed`` for the gradient convention).

    Args:
        z1: [N, D] projections of the first views, N >= 2 per process.
        z2: [N, D] projections of the second views, row b paired with row b of ``z1``.
        lambda_offdiag: weight of the redundancy-reduction (off-diagonal) term.
        eps: added to the variance before the square root.

    Returns:
        The scalar loss, in the input dtype, or in float32 for lower-precision inputs.
    """
    check_paired_rows("barlow_twins", z1, z2)
    check_two_rows_per_process("barlow_twins", z1, "to standardise each dimension")

    # The D x D correlation and the per-dimension sums overflow or lose precision in half
    # precision; autocast would re-lower the matmul.
    dtype = torch.promote_types(z1.dtype, torch.float32)
    with torch.autocast(z1.device.type, enabled=False):
        z1, z2 = z1.to(dtype), z2.to(dtype)
        dim = z1.shape[1]
        (centred1, centred2), n_global = centre_over_global_batch(z1, z2)

        # Cross-products and squared deviations share one collective; standardising afterwards
        # is the same as correlating standardised inputs.
        local_stats = torch.cat(
            [
                (centred1.T @ centred2).flatten(),
                centred1.pow(2).sum(dim=0),
                centred2.pow(2).sum(dim=0),
            ]
        )
        stats = all_reduce_sum(local_stats)
        cross = stats[: dim * dim].view(dim, dim)
        std1 = (stats[dim * dim : dim * dim + dim] / n_global + eps).sqrt()
        std2 = (stats[dim * dim + dim :] / n_global + eps).sqrt()
        c = cross / n_global / std1[:, None] / std2[None, :]

        on_diagonal = (1 - c.diagonal()).pow(2).sum()
        # The flattened matrix without its last element, viewed as (D-1) x (D+1), starts every
        # row with a diagonal entry: drop that column to keep exactly the off-diagonal ones.
        off_diagonal = c.flatten()[:-1].view(dim - 1, dim + 1)[:, 1:].pow(2).sum()
        return on_diagonal + lambda_offdiag * off_diagonal
