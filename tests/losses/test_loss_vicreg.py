import math

import pytest
import torch

from ssl_lightning.losses.vicreg import vicreg

from helpers.gloo import assert_global_batch_value_and_gradients, loss_on_one_rank, run_on_two_ranks


def reference_vicreg(z1, z2, sim_weight, var_weight, cov_weight, eps):
    """Bardes et al. eq. 1-6 with the official code's branch averaging, written entry by entry."""
    n, dim = z1.shape
    invariance = sum((z1[b, j] - z2[b, j]) ** 2 for b in range(n) for j in range(dim)) / (n * dim)

    def variance_and_covariance(z):
        means = [sum(z[b, j] for b in range(n)) / n for j in range(dim)]
        cov = [
            [sum((z[b, i] - means[i]) * (z[b, j] - means[j]) for b in range(n)) / (n - 1) for j in range(dim)]
            for i in range(dim)
        ]
        hinge = sum(torch.clamp(1 - torch.sqrt(cov[j][j] + eps), min=0) for j in range(dim)) / dim
        off_diagonal = sum(cov[i][j] ** 2 for i in range(dim) for j in range(dim) if i != j) / dim
        return hinge, off_diagonal

    hinge1, off1 = variance_and_covariance(z1)
    hinge2, off2 = variance_and_covariance(z2)
    variance, covariance = (hinge1 + hinge2) / 2, off1 + off2
    loss = sim_weight * invariance + var_weight * variance + cov_weight * covariance
    return loss, invariance, variance, covariance


def official_vicreg(z1, z2, sim_weight, var_weight, cov_weight, eps):
    """The loss as facebookresearch/vicreg main_vicreg.py computes it (one process)."""
    n, dim = z1.shape
    repr_loss = torch.nn.functional.mse_loss(z1, z2)
    x, y = z1 - z1.mean(dim=0), z2 - z2.mean(dim=0)
    std_x, std_y = torch.sqrt(x.var(dim=0) + eps), torch.sqrt(y.var(dim=0) + eps)
    std_loss = torch.mean(torch.relu(1 - std_x)) / 2 + torch.mean(torch.relu(1 - std_y)) / 2
    cov_x, cov_y = x.T @ x / (n - 1), y.T @ y / (n - 1)
    off = ~torch.eye(dim, dtype=torch.bool)
    cov_loss = cov_x[off].pow(2).sum() / dim + cov_y[off].pow(2).sum() / dim
    loss = sim_weight * repr_loss + var_weight * std_loss + cov_weight * cov_loss
    return loss, repr_loss, std_loss, cov_loss


def value_and_grads(loss_fn, z1, z2, *args):
    z1 = z1.clone().requires_grad_(True)
    z2 = z2.clone().requires_grad_(True)
    loss, *terms = loss_fn(z1, z2, *args)
    return (loss, *torch.autograd.grad(loss, (z1, z2)), *(torch.as_tensor(t).detach() for t in terms))


def assert_matches(reference, z1, z2, *args):
    actual = value_and_grads(vicreg, z1, z2, *args)
    expected = value_and_grads(reference, z1, z2, *args)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e.to(a.dtype), rtol=1e-10, atol=1e-12)


def random_pair(batch, dim, seed, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    # Per-dimension offsets and scales both above and below 1 put some stds on each side of the hinge.
    spread = scale * (0.2 + 2 * torch.rand(dim, generator=generator, dtype=torch.float64))
    z1 = 1 + spread * torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    z2 = z1 + 0.5 * torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    return z1, z2


WEIGHTS = [(25.0, 25.0, 1.0), (1.0, 0.5, 3.0)]


@pytest.mark.parametrize("batch, dim", [(2, 1), (2, 3), (5, 4), (8, 6)])
@pytest.mark.parametrize("weights", WEIGHTS)
def test_value_terms_and_gradient_match_reference(batch, dim, weights):
    z1, z2 = random_pair(batch, dim, seed=batch * 100 + dim)
    assert_matches(reference_vicreg, z1, z2, *weights, 1e-4)


@pytest.mark.parametrize("eps", [1e-4, 0.3])
def test_value_terms_and_gradient_match_official_implementation(eps):
    z1, z2 = random_pair(32, 16, seed=0)
    assert_matches(official_vicreg, z1, z2, 25.0, 25.0, 1.0, eps)


def test_identical_views_have_zero_invariance():
    z1, _ = random_pair(6, 4, seed=1)
    assert_matches(reference_vicreg, z1, z1.clone(), 25.0, 25.0, 1.0, 1e-4)
    assert vicreg(z1, z1.clone()).invariance.item() == 0.0


def test_constant_batch_has_the_largest_variance_term_and_no_covariance():
    # Every std is 0, so each dimension's hinge is 1 - sqrt(eps), in both branches.
    z = torch.full((4, 3), 2.5, dtype=torch.float64)
    terms = vicreg(z, z.clone(), var_weight=25.0)
    expected_variance = 1 - math.sqrt(1e-4)
    torch.testing.assert_close(terms.variance, torch.tensor(expected_variance, dtype=torch.float64))
    torch.testing.assert_close(terms.loss, torch.tensor(25.0 * expected_variance, dtype=torch.float64))
    assert terms.covariance.item() == 0.0 and terms.invariance.item() == 0.0


def test_batch_of_two_uses_one_degree_of_freedom():
    # Two samples: Var = (a - b)^2 / 2 with the unbiased N - 1 = 1.
    z1 = torch.tensor([[0.0], [0.6]], dtype=torch.float64)
    terms = vicreg(z1, z1.clone(), eps=0.0)
    torch.testing.assert_close(terms.variance, torch.tensor(1 - math.sqrt(0.36 / 2), dtype=torch.float64))
    assert_matches(reference_vicreg, *random_pair(2, 3, seed=4), 25.0, 25.0, 1.0, 1e-4)


def test_stds_above_one_leave_only_invariance_and_covariance():
    z1, z2 = random_pair(64, 4, seed=5, scale=20.0)
    assert vicreg(z1, z2).variance.item() == 0.0


def test_bfloat16_inputs_give_float32_loss_close_to_float64():
    z1, z2 = random_pair(64, 8, seed=2)
    low = vicreg(z1.bfloat16(), z2.bfloat16())
    assert all(term.dtype == torch.float32 for term in low)
    exact = vicreg(z1.bfloat16().double(), z2.bfloat16().double())
    torch.testing.assert_close(low.loss.double(), exact.loss, rtol=1e-5, atol=0)


def test_autocast_does_not_lower_the_covariance_matmul():
    z1, z2 = random_pair(64, 32, seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = vicreg(z1.float(), z2.float())
    exact = vicreg(z1.float().double(), z2.float().double())
    torch.testing.assert_close(under_autocast.loss.double(), exact.loss, rtol=1e-5, atol=0)


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
        vicreg(torch.randn(shape1), torch.randn(shape2))


def vicreg_total(z1, z2):
    """Module level, so the gloo worker can unpickle it."""
    return vicreg(z1, z2).loss


def vicreg_with_terms_on_one_rank(shards):
    import torch.distributed as dist

    z1, z2 = (z.clone().requires_grad_(True) for z in shards[dist.get_rank()])
    terms = vicreg(z1, z2, 2.0, 3.0, 0.5)
    grads = torch.autograd.grad(terms.loss, (z1, z2))
    return {"terms": torch.stack([t.detach() for t in terms]), "grads": grads}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("shard_sizes", [[4, 4], [3, 5]], ids=["equal", "uneven"])
def test_two_ranks_match_one_process_on_the_global_batch(tmp_path, shard_sizes):
    z1, z2 = random_pair(sum(shard_sizes), 5, seed=7)
    shards = list(zip(z1.split(shard_sizes), z2.split(shard_sizes)))

    results = run_on_two_ranks(loss_on_one_rank, tmp_path, vicreg_total, shards)
    loss, grad1, _ = value_and_grads(lambda a, b: (vicreg(a, b).loss,), z1, z2)
    assert_global_batch_value_and_gradients(results, loss, grad1, shard_sizes)


@pytest.mark.timeout(120)
def test_two_ranks_return_the_global_terms_and_second_view_gradient(tmp_path):
    shard_sizes = [3, 5]
    z1, z2 = random_pair(sum(shard_sizes), 4, seed=8)
    shards = list(zip(z1.split(shard_sizes), z2.split(shard_sizes)))
    results = run_on_two_ranks(vicreg_with_terms_on_one_rank, tmp_path, shards)

    a, b = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    expected = vicreg(a, b, 2.0, 3.0, 0.5)
    grads = torch.autograd.grad(expected.loss, (a, b))
    start = 0
    for rank, (result, size) in enumerate(zip(results, shard_sizes)):
        torch.testing.assert_close(result["terms"], torch.stack([t.detach() for t in expected]), rtol=1e-10, atol=1e-12)
        for got, full in zip(result["grads"], grads):
            torch.testing.assert_close(got, 2 * full[start : start + size], rtol=1e-10, atol=1e-12)
        start += size
