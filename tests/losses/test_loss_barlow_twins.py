import pytest
import torch

from ssl_lightning.losses import barlow_twins


def reference_barlow_twins(z1, z2, lambda_offdiag, eps):
    """Zbontar et al. 2021 eq. 1 with per-dimension standardisation, written index by index."""
    n, dim = z1.shape

    def standardise(z):
        columns = []
        for i in range(dim):
            mean = sum(z[b, i] for b in range(n)) / n
            variance = sum((z[b, i] - mean) ** 2 for b in range(n)) / n
            std = torch.sqrt(variance + eps)
            columns.append(torch.stack([(z[b, i] - mean) / std for b in range(n)]))
        return columns

    columns1, columns2 = standardise(z1), standardise(z2)
    loss = 0.0
    for i in range(dim):
        for j in range(dim):
            c_ij = (columns1[i] * columns2[j]).sum() / n
            loss = loss + ((1 - c_ij) ** 2 if i == j else lambda_offdiag * c_ij**2)
    return loss


def official_barlow_twins(z1, z2, lambda_offdiag, eps):
    """The loss as computed in facebookresearch/barlowtwins main.py (one process)."""
    n, dim = z1.shape
    bn = torch.nn.BatchNorm1d(dim, affine=False, eps=eps).to(z1.dtype)
    c = bn(z1).T @ bn(z2) / n
    on_diag = (torch.diagonal(c) - 1).pow(2).sum()
    off_diag = c.flatten()[:-1].view(dim - 1, dim + 1)[:, 1:].flatten().pow(2).sum()
    return on_diag + lambda_offdiag * off_diag


def value_and_grads(loss_fn, z1, z2, *args):
    z1 = z1.clone().requires_grad_(True)
    z2 = z2.clone().requires_grad_(True)
    loss = loss_fn(z1, z2, *args)
    return (loss, *torch.autograd.grad(loss, (z1, z2)))


def assert_matches(reference, z1, z2, lambda_offdiag, eps):
    actual = value_and_grads(barlow_twins, z1, z2, lambda_offdiag, eps)
    expected = value_and_grads(reference, z1, z2, lambda_offdiag, eps)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


def random_pair(batch, dim, seed):
    generator = torch.Generator().manual_seed(seed)
    # An offset and scale per dimension make the standardisation matter.
    scale = 1 + 3 * torch.rand(dim, generator=generator, dtype=torch.float64)
    z1 = 2 + scale * torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    z2 = z1 + 0.5 * torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    return z1, z2


@pytest.mark.parametrize("batch, dim", [(2, 1), (2, 3), (5, 4), (8, 6)])
@pytest.mark.parametrize("lambda_offdiag", [5e-3, 0.1, 1.0])
def test_value_and_gradient_match_reference(batch, dim, lambda_offdiag):
    z1, z2 = random_pair(batch, dim, seed=batch * 100 + dim)
    assert_matches(reference_barlow_twins, z1, z2, lambda_offdiag, 1e-5)


@pytest.mark.parametrize("eps", [1e-5, 0.5])
def test_value_and_gradient_match_official_implementation(eps):
    z1, z2 = random_pair(32, 16, seed=0)
    assert_matches(official_barlow_twins, z1, z2, 5e-3, eps)


def test_identical_views_match_reference_and_nearly_zero_on_diagonal_term():
    z1, _ = random_pair(6, 4, seed=1)
    assert_matches(reference_barlow_twins, z1, z1.clone(), 5e-3, 1e-5)
    assert_matches(reference_barlow_twins, z1, z1.clone(), 0.0, 1e-5)
    assert barlow_twins(z1, z1.clone(), lambda_offdiag=0.0).item() < 1e-8


def test_float16_inputs_do_not_overflow():
    # Column sums of 128 values near 1000 exceed float16's maximum of 65504.
    z1, z2 = random_pair(128, 8, seed=2)
    z1, z2 = (1000 + z1).half(), (1000 + z2).half()
    low = barlow_twins(z1, z2)
    assert low.dtype == torch.float32
    exact = barlow_twins(z1.double(), z2.double())
    torch.testing.assert_close(low.double(), exact, rtol=1e-4, atol=0)


def test_autocast_does_not_lower_the_correlation_matmul():
    z1, z2 = random_pair(64, 32, seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = barlow_twins(z1.float(), z2.float())
    exact = barlow_twins(z1.float().double(), z2.float().double())
    torch.testing.assert_close(under_autocast.double(), exact, rtol=1e-5, atol=0)


@pytest.mark.parametrize(
    "shape1, shape2, match",
    [
        ((4, 3), (5, 3), r"same 2-D shape.*\(4, 3\) and \(5, 3\)"),
        ((4, 3), (4, 2), r"same 2-D shape.*\(4, 3\) and \(4, 2\)"),
        ((4, 3, 2), (4, 3, 2), r"same 2-D shape.*\(4, 3, 2\) and \(4, 3, 2\)"),
        ((1, 3), (1, 3), r"at least 2 samples per process.*\(1, 3\)"),
    ],
)
def test_rejects_bad_shapes(shape1, shape2, match):
    with pytest.raises(ValueError, match=match):
        barlow_twins(torch.randn(shape1), torch.randn(shape2))
