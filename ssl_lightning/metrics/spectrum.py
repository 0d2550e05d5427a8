"""Spectral measures of an embedding matrix: RankMe, effective rank and alpha-ReQ.

Pure functions on an ``[N, D]`` tensor; no Lightning. Everything is computed in float64.

Singular values come from the eigenvalues of the smaller Gram matrix (``x xᵀ`` when N <= D,
else ``xᵀ x``), not from an SVD: the Gram product costs O(N·D·min(N, D)) and the symmetric
eigen-solver O(min(N, D)³), which is exact (up to float64 rounding) and several times faster than
``torch.linalg.svdvals`` on 25,600 x 2,048 matrices (see ``benchmarks/monitoring_cost.py``).
:func:`spectrum` computes the Gram matrix once and derives the centred one from it, so that
RankMe (raw matrix) and the covariance measures share the expensive product.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

RANKME_EPS = 1e-7  # the constant Garrido et al. add to every normalised singular value


@dataclass(frozen=True)
class Spectrum:
    """Singular values of the raw matrix and eigenvalues of the covariance (both descending), and
    the embedding width ``dim`` (the largest possible rank)."""

    singular_values: torch.Tensor
    covariance_eigenvalues: torch.Tensor
    dim: int


def _check_matrix(x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 2 or x.shape[0] < 2 or x.shape[1] < 1:
        raise ValueError(f"expected an [N, D] embedding matrix with N >= 2 rows, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("the embedding matrix holds NaN or inf values; spectral measures are undefined")
    return x.detach().to(torch.float64)


def _descending_eigenvalues(symmetric: torch.Tensor) -> torch.Tensor:
    # Rounding makes the smallest eigenvalues of a PSD matrix slightly negative; they are zero.
    return torch.linalg.eigvalsh(symmetric).clamp_min(0).flip(0)


def spectrum(x: torch.Tensor) -> Spectrum:
    """Singular values of ``x`` and eigenvalues of its covariance, with one Gram product."""
    x = _check_matrix(x)
    n, d = x.shape
    mean = x.mean(0)
    if n <= d:
        gram = x @ x.T
        # Centring is a projection on both sides: (I - 11ᵀ/n) G (I - 11ᵀ/n).
        row_mean = gram.mean(1, keepdim=True)
        centred = gram - row_mean - row_mean.T + gram.mean()
    else:
        gram = x.T @ x
        centred = gram - n * torch.outer(mean, mean)
    singular = _descending_eigenvalues(gram).sqrt()
    covariance = _descending_eigenvalues(centred) / (n - 1)
    return Spectrum(singular, covariance, d)


def singular_values(x: torch.Tensor) -> torch.Tensor:
    """Singular values of the raw (not centred) ``[N, D]`` matrix, descending, min(N, D) of them."""
    x = _check_matrix(x)
    gram = x @ x.T if x.shape[0] <= x.shape[1] else x.T @ x
    return _descending_eigenvalues(gram).sqrt()


def covariance_eigenvalues(x: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of the covariance of the centred rows (divisor N - 1), descending."""
    return spectrum(x).covariance_eigenvalues


def _entropy_exp(p: torch.Tensor) -> float:
    # 0 log 0 = 0 by continuity.
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def rankme_from_singular_values(sigma: torch.Tensor) -> float:
    """RankMe (Garrido et al., ICML 2023): exp(-sum p_k log p_k), p_k = sigma_k / ||sigma||_1 + 1e-7.

    An all-zero matrix has no spectrum to normalise; its RankMe is defined as 0."""
    total = sigma.sum()
    if total <= 0:
        return 0.0
    return _entropy_exp(sigma / total + RANKME_EPS)


def rankme(x: torch.Tensor) -> float:
    """RankMe of the raw ``[N, D]`` embedding matrix; between ~1 (collapse) and min(N, D)."""
    return rankme_from_singular_values(singular_values(x))


def effective_rank_from_eigenvalues(eigenvalues: torch.Tensor) -> float:
    """exp of the Shannon entropy of the eigenvalues normalised to sum 1 (0 for a zero matrix)."""
    total = eigenvalues.sum()
    if total <= 0:
        return 0.0
    return _entropy_exp(eigenvalues / total)


def effective_rank(x: torch.Tensor) -> float:
    """Effective rank (Roy & Vetterli 2007) of the covariance of the centred embeddings."""
    return effective_rank_from_eigenvalues(covariance_eigenvalues(x))


def alpha_req_from_eigenvalues(
    eigenvalues: torch.Tensor, fit_range: tuple[int, int | None] = (1, None)
) -> tuple[float, float]:
    """(alpha, R²) of the least-squares line log(lambda_i) = c - alpha log(i) (Agrawal et al. 2022).

    ``fit_range = (first, last)`` are 1-based eigenvalue ranks, inclusive; ``last=None`` means the
    last one. Zero eigenvalues inside the range (rank-deficient data) have no logarithm and are left
    out of the fit. alpha > 0 means the spectrum decays; NaN when fewer than 2 points remain.
    """
    first, last = fit_range
    if first < 1 or (last is not None and last < first):
        raise ValueError(f"fit_range must be 1-based (first, last) with 1 <= first <= last, got {fit_range}")
    ranks = torch.arange(1, len(eigenvalues) + 1, dtype=torch.float64)
    chosen = slice(first - 1, last)
    ranks, values = ranks[chosen], eigenvalues.to(torch.float64)[chosen]
    positive = values > 0
    if int(positive.sum()) < 2:
        return float("nan"), float("nan")
    log_i, log_v = ranks[positive].log(), values[positive].log()
    centred_i, centred_v = log_i - log_i.mean(), log_v - log_v.mean()
    slope = (centred_i * centred_v).sum() / (centred_i * centred_i).sum()
    residual = centred_v - slope * centred_i
    total = (centred_v * centred_v).sum()
    r2 = 1.0 - float((residual * residual).sum() / total) if total > 0 else 1.0
    return -float(slope), r2


def alpha_req(x: torch.Tensor, fit_range: tuple[int, int | None] = (1, None)) -> tuple[float, float]:
    """alpha-ReQ exponent and R² of the covariance eigen-spectrum of ``x`` (see above)."""
    return alpha_req_from_eigenvalues(covariance_eigenvalues(x), fit_range)
