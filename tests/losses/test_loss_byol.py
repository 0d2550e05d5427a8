import pytest
import torch

from ssl_lightning.losses import normalized_regression


def reference_normalized_regression(p, z):
    """BYOL eq. 2, ||p/||p|| - z/||z|| ||^2, sample by sample, averaged over the batch."""
    total = 0.0
    for p_i, z_i in zip(p, z):
        difference = p_i / torch.sqrt((p_i * p_i).sum()) - z_i / torch.sqrt((z_i * z_i).sum())
        total = total + (difference * difference).sum()
    return total / len(p)


def value_and_grads(loss_fn, p, z):
    p = p.clone().requires_grad_(True)
    z = z.clone().requires_grad_(True)
    loss = loss_fn(p, z)
    return (loss, *torch.autograd.grad(loss, (p, z)))


def assert_matches_reference(p, z):
    actual = value_and_grads(normalized_regression, p, z)
    expected = value_and_grads(reference_normalized_regression, p, z)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("batch, dim", [(1, 3), (2, 5), (7, 4), (16, 32)])
def test_value_and_gradient_match_reference(batch, dim):
    generator = torch.Generator().manual_seed(batch * 100 + dim)
    p = torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    z = torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    assert_matches_reference(p, z)


def test_identical_inputs_give_zero_loss():
    p = torch.randn(6, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    loss, grad_p, grad_z = value_and_grads(normalized_regression, p, 2.0 * p)
    torch.testing.assert_close(loss.item(), 0.0, rtol=0, atol=1e-14)
    torch.testing.assert_close(grad_p, torch.zeros_like(p), rtol=0, atol=1e-14)
    torch.testing.assert_close(grad_z, torch.zeros_like(p), rtol=0, atol=1e-14)


def test_opposite_inputs_give_maximal_loss():
    p = torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(normalized_regression(p, -p).item(), 4.0, rtol=1e-14, atol=0)


def test_does_not_detach_the_target():
    p = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    z = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    normalized_regression(p, z).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_float16_inputs_give_float32_loss_close_to_float64():
    p, z = torch.randn(2, 32, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    low = normalized_regression(p.half(), z.half())
    assert low.dtype == torch.float32
    exact = normalized_regression(p.half().double(), z.half().double())
    torch.testing.assert_close(low.double(), exact, rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    "shape1, shape2, match",
    [
        ((4, 3), (5, 3), r"same 2-D shape.*\(4, 3\) and \(5, 3\)"),
        ((4, 3, 2), (4, 3, 2), r"same 2-D shape.*\(4, 3, 2\) and \(4, 3, 2\)"),
    ],
)
def test_rejects_bad_shapes(shape1, shape2, match):
    with pytest.raises(ValueError, match=match):
        normalized_regression(torch.randn(shape1), torch.randn(shape2))
