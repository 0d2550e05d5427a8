import math

import numpy as np
import pytest
import torch

from ssl_lightning.metrics.spectrum import (
    alpha_req,
    alpha_req_from_eigenvalues,
    covariance_eigenvalues,
    effective_rank,
    rankme,
    singular_values,
    spectrum,
)


def reference_rankme(x: np.ndarray) -> float:
    """Garrido et al. (2023), Eq. 1, written plainly: SVD of the raw matrix, p = s / |s|_1 + 1e-7."""
    s = np.linalg.svd(x, compute_uv=False)
    p = s / np.sum(np.abs(s)) + 1e-7
    return math.exp(-np.sum(p * np.log(p)))


@pytest.mark.parametrize("n, d", [(20, 50), (200, 30), (40, 40)])
def test_rankme_matches_numpy_reference(n, d):
    x = np.random.default_rng(0).standard_normal((n, d)) @ np.diag(np.linspace(0.1, 3, d))
    x += 2.0  # a mean offset: RankMe must NOT centre
    assert rankme(torch.from_numpy(x)) == pytest.approx(reference_rankme(x), rel=1e-5)


def test_singular_values_match_svd_for_both_gram_shapes():
    g = torch.Generator().manual_seed(0)
    for shape in [(10, 30), (30, 10)]:
        x = torch.randn(*shape, generator=g, dtype=torch.float64)
        torch.testing.assert_close(singular_values(x), torch.linalg.svdvals(x), rtol=1e-8, atol=1e-8)


def test_covariance_eigenvalues_match_numpy_cov_for_both_gram_shapes():
    rng = np.random.default_rng(1)
    for shape in [(12, 30), (60, 8)]:
        x = rng.standard_normal(shape) + 5.0
        expected = np.sort(np.clip(np.linalg.eigvalsh(np.cov(x, rowvar=False)), 0, None))[::-1]
        got = covariance_eigenvalues(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(got[: min(shape)], expected[: min(shape)], rtol=1e-7, atol=1e-9)


def test_rankme_of_orthogonal_embeddings_is_their_dimension():
    d = 16
    q, _ = torch.linalg.qr(torch.randn(64, d, dtype=torch.float64))  # 64 rows, orthonormal columns
    assert rankme(q) == pytest.approx(d, rel=1e-4)


def test_rankme_of_rank_one_embeddings_is_one():
    x = torch.randn(100, 1, dtype=torch.float64) * torch.randn(1, 32, dtype=torch.float64)
    assert rankme(x) == pytest.approx(1.0, abs=1e-3)
    assert rankme(torch.ones(50, 32)) == pytest.approx(1.0, abs=1e-3)  # complete collapse


def test_rankme_of_gaussian_with_twelve_samples_per_dimension_is_near_full():
    d = 64
    x = torch.randn(12 * d, d, generator=torch.Generator().manual_seed(0))
    assert rankme(x) >= 0.97 * d


def test_rankme_of_zero_matrix_is_zero():
    assert rankme(torch.zeros(10, 4)) == 0.0


def test_alpha_req_recovers_power_law_exponent():
    d, alpha = 64, 1.3
    scales = torch.arange(1, d + 1, dtype=torch.float64) ** (-alpha / 2)  # variances i^-alpha
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    # Exactly whitened rows so that the sample covariance has exactly the chosen spectrum.
    z = torch.randn(4000, d, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    z = z - z.mean(0)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(z.T @ z / (len(z) - 1))).T
    x = (z * scales) @ q.T
    fitted, r2 = alpha_req(x)
    assert fitted == pytest.approx(alpha, rel=0.05)
    assert r2 > 0.99


def test_alpha_req_fit_range_and_sign():
    eigenvalues = torch.cat([torch.arange(1, 11, dtype=torch.float64) ** -2.0, torch.zeros(3)])
    assert alpha_req_from_eigenvalues(eigenvalues, (1, 5))[0] == pytest.approx(2.0)
    assert alpha_req_from_eigenvalues(eigenvalues, (3, None))[0] == pytest.approx(2.0)  # zeros left out
    with pytest.raises(ValueError, match="1-based"):
        alpha_req_from_eigenvalues(eigenvalues, (0, 5))


def test_effective_rank_of_isotropic_and_low_rank_gaussians():
    g = torch.Generator().manual_seed(0)
    d, r = 32, 5
    isotropic = torch.randn(5000, d, generator=g, dtype=torch.float64)
    assert effective_rank(isotropic) == pytest.approx(d, rel=0.03)
    low_rank = torch.randn(5000, r, generator=g, dtype=torch.float64) @ torch.linalg.qr(
        torch.randn(d, r, generator=g, dtype=torch.float64)
    )[0].T
    assert effective_rank(low_rank + 3.0) == pytest.approx(r, rel=0.03)  # an offset changes nothing


def test_spectrum_shares_one_gram_and_rejects_bad_input():
    x = torch.randn(30, 7, dtype=torch.float64)
    result = spectrum(x)
    assert result.dim == 7
    torch.testing.assert_close(result.singular_values, singular_values(x))
    with pytest.raises(ValueError, match="NaN"):
        spectrum(torch.full((4, 3), float("nan")))
    with pytest.raises(ValueError, match="N >= 2"):
        spectrum(torch.ones(1, 3))
