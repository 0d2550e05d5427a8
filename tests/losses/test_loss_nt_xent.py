import math

import pytest
import torch

from ssl_lightning.losses import nt_xent


def reference_nt_xent(z1, z2, temperature):
    """SimCLR eq. 1 written out sample by sample, with both orderings of every positive pair."""
    samples = list(z1) + list(z2)
    unit = [v / torch.sqrt((v * v).sum()) for v in samples]
    n_pairs = len(z1)
    total = 0.0
    for i in range(2 * n_pairs):
        positive = (i + n_pairs) % (2 * n_pairs)
        denominator = sum(
            torch.exp((unit[i] * unit[k]).sum() / temperature) for k in range(2 * n_pairs) if k != i
        )
        numerator = torch.exp((unit[i] * unit[positive]).sum() / temperature)
        total = total - torch.log(numerator / denominator)
    return total / (2 * n_pairs)


def value_and_grads(loss_fn, z1, z2, *args):
    z1 = z1.clone().requires_grad_(True)
    z2 = z2.clone().requires_grad_(True)
    loss = loss_fn(z1, z2, *args)
    return (loss, *torch.autograd.grad(loss, (z1, z2)))


def assert_matches_reference(z1, z2, temperature):
    actual = value_and_grads(nt_xent, z1, z2, temperature)
    expected = value_and_grads(reference_nt_xent, z1, z2, temperature)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n_pairs, dim", [(2, 3), (5, 4), (8, 16)])
@pytest.mark.parametrize("temperature", [0.05, 0.1, 0.5, 2.0])
def test_value_and_gradient_match_reference(n_pairs, dim, temperature):
    generator = torch.Generator().manual_seed(n_pairs * 100 + dim)
    z1 = torch.randn(n_pairs, dim, generator=generator, dtype=torch.float64)
    z2 = torch.randn(n_pairs, dim, generator=generator, dtype=torch.float64)
    assert_matches_reference(z1, z2, temperature)


def test_identical_views_match_reference():
    z = torch.randn(6, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert_matches_reference(z, z.clone(), 0.1)


def test_single_pair_has_no_negatives_and_zero_loss():
    z1, z2 = torch.randn(2, 1, 4, dtype=torch.float64)
    assert nt_xent(z1, z2).item() == 0.0


def test_large_temperature_tends_to_uniform_softmax():
    z1, z2 = torch.randn(2, 7, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert_matches_reference(z1, z2, 1e4)
    torch.testing.assert_close(nt_xent(z1, z2, 1e4).item(), math.log(2 * 7 - 1), rtol=1e-3, atol=0)


def test_invariant_to_projection_scale():
    z1, z2 = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    torch.testing.assert_close(nt_xent(3.0 * z1, 0.25 * z2), nt_xent(z1, z2), rtol=1e-12, atol=0)


def test_bfloat16_inputs_give_float32_loss_close_to_float64():
    z1, z2 = torch.randn(2, 64, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    low = nt_xent(z1.bfloat16(), z2.bfloat16(), 0.01)
    assert low.dtype == torch.float32
    exact = nt_xent(z1.bfloat16().double(), z2.bfloat16().double(), 0.01)
    torch.testing.assert_close(low.double(), exact, rtol=1e-5, atol=0)


def test_autocast_does_not_lower_the_similarity_matmul():
    z1, z2 = torch.randn(2, 64, 32, generator=torch.Generator().manual_seed(4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = nt_xent(z1, z2, 0.01)
    exact = nt_xent(z1.double(), z2.double(), 0.01)
    torch.testing.assert_close(under_autocast.double(), exact, rtol=1e-5, atol=0)


@pytest.mark.parametrize(
    "shape1, shape2, match",
    [
        ((4, 3), (5, 3), r"same 2-D shape.*\(4, 3\) and \(5, 3\)"),
        ((4, 3), (4, 2), r"same 2-D shape.*\(4, 3\) and \(4, 2\)"),
        ((4, 3, 2), (4, 3, 2), r"same 2-D shape.*\(4, 3, 2\) and \(4, 3, 2\)"),
        ((4,), (4,), r"same 2-D shape.*\(4,\) and \(4,\)"),
    ],
)
def test_rejects_bad_shapes(shape1, shape2, match):
    with pytest.raises(ValueError, match=match):
        nt_xent(torch.randn(shape1), torch.randn(shape2))


def test_rejects_non_positive_temperature():
    with pytest.raises(ValueError, match="temperature > 0, got 0"):
        nt_xent(torch.randn(4, 3), torch.randn(4, 3), temperature=0)
