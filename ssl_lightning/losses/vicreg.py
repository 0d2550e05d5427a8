"""VICReg's variance-invariance-covariance loss."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ssl_lightning.distributed import all_reduce_sum
from ssl_lightning.losses._batch_stats import centre_over_global_batch, check_two_rows_per_process
from ssl_lightning.losses._checks import check_paired_rows


class VICRegLoss(NamedTuple):
    """The weighted total and its three unweighted terms (for logging)."""

    loss: Tensor
    invariance: Tensor
    variance: Tensor
    covariance: Tensor


def vicreg(
    z1: Tensor,
    z2: Tensor,
    sim_weight: float = 25.0,
    var_weight: float = 25.0,
    cov_weight: float = 1.0,
    eps: float = 1e-4,
) -> VICRegLoss:
    """Variance-invariance-covariance loss of VICReg (Bardes, Ponce and LeCun, ICLR 2022, eq. 1-6).

    Over the global batch of N' pairs (all ranks) of D-dimensional embeddings, with the unbiased
    statistics of the official code (facebookresearch/vicreg, main_vicreg.py):

        s(Z, Z')  = 1/(N' D) sum_b ||z_b - z'_b||^2                              (invariance)
        v(Z)      = 1/D sum_j max(0, 1 - sqrt(Var(z_j) + eps))                    (variance)
        C(Z)      = 1/(N'-1) sum_b (z_b - mean)(z_b - mean)^T
        c(Z)      = 1/D sum_{i != j} C(Z)[i, j]^2                                 (covariance)
        L         = sim_weight s + var_weight (v(Z) + v(Z')) / 2 + cov_weight (c(Z) + c(Z'))

    As in the official code, the invariance is the mean squared error (the paper's eq. 5 divided
    by D) and the variance term is averaged over the two branches while the covariance term is
    summed (eq. 6 sums both); the paper's weights 25 / 25 / 1 are the code's.

    Distributed: only per-dimension sums, the D x D matrices of centred products and the squared
    differences are all-reduced (two collectives), never the batch itself; every rank returns the
    global values (see ``ssl_lightning.distributed`` for the gradient convention).

    Args:
        z1: [N, D] embeddings (expander outputs) of the first views, N >= 2 per process.
        z2: [N, D] embeddings of the second views, row b paired with row b of ``z1``.
        sim_weight, var_weight, cov_weight: the paper's lambda, mu and nu.
        eps: added to the variance before the square root.

    Returns:
        ``VICRegLoss(loss, invariance, variance, covariance)``: the weighted total and the
        unweighted terms s, (v(Z) + v(Z')) / 2 and c(Z) + c(Z'), in the input dtype, or in
        float32 for lower-precision inputs.
    """
    check_paired_rows("vicreg", z1, z2)
    check_two_rows_per_process("vicreg", z1, "for the unbiased variance")

    # The D x D covariance and the per-dimension sums lose precision in half precision;
    # autocast would re-lower the matmuls.
    dtype = torch.promote_types(z1.dtype, torch.float32)
    with torch.autocast(z1.device.type, enabled=False):
        z1, z2 = z1.to(dtype), z2.to(dtype)
        dim = z1.shape[1]
        (centred1, centred2), n_global = centre_over_global_batch(z1, z2)

        # Centred products (their diagonals are the squared deviations) and the squared view
        # differences share one collective.
        local_stats = torch.cat(
            [
                (centred1.T @ centred1).flatten(),
                (centred2.T @ centred2).flatten(),
                (z1 - z2).pow(2).sum().unsqueeze(0),
            ]
        )
        stats = all_reduce_sum(local_stats)
        cov1 = stats[: dim * dim].view(dim, dim) / (n_global - 1)
        cov2 = stats[dim * dim : 2 * dim * dim].view(dim, dim) / (n_global - 1)

        invariance = stats[-1] / (n_global * dim)
        variance = (_hinge_on_std(cov1, eps) + _hinge_on_std(cov2, eps)) / 2
        covariance = _off_diagonal_energy(cov1) + _off_diagonal_energy(cov2)
        loss = sim_weight * invariance + var_weight * variance + cov_weight * covariance
        return VICRegLoss(loss, invariance, variance, covariance)


def _hinge_on_std(cov: Tensor, eps: float) -> Tensor:
    """Mean over dimensions of max(0, 1 - std): pushes every dimension's std up to at least 1."""
    return torch.relu(1 - (cov.diagonal() + eps).sqrt()).mean()


def _off_diagonal_energy(cov: Tensor) -> Tensor:
    """Sum of the squared off-diagonal covariances, divided by the dimension."""
    dim = cov.shape[0]
    # The flattened matrix without its last element, viewed as (D-1) x (D+1), starts every row
    # with a diagonal entry: drop that column to keep exactly the off-diagonal ones.
    return cov.flatten()[:-1].view(dim - 1, dim + 1)[:, 1:].pow(2).sum() / dim
