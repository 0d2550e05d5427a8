import numpy as np
import pytest
import torch
import torch.distributed as dist

from ssl_lightning.losses.sinkhorn import sinkhorn_knopp

from helpers.gloo import run_on_two_ranks


def reference_sinkhorn(scores: np.ndarray, epsilon: float, iterations: int) -> np.ndarray:
    """The official ``distributed_sinkhorn`` on one process, entry by entry."""
    num_samples, num_prototypes = scores.shape
    q = np.exp(scores.T / epsilon)  # [K, B]
    q = q / q.sum()
    for _ in range(iterations):
        for k in range(num_prototypes):
            q[k, :] = q[k, :] / q[k, :].sum() / num_prototypes
        for b in range(num_samples):
            q[:, b] = q[:, b] / q[:, b].sum() / num_samples
    return (q * num_samples).T


def random_scores(num_samples, num_prototypes, seed=0, dtype=torch.float64):
    # cosine similarities, as SwAV's: in [-1, 1]
    return torch.rand(num_samples, num_prototypes, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 2 - 1


@pytest.mark.parametrize("num_samples, num_prototypes", [(1, 1), (1, 5), (6, 4), (8, 30), (16, 3)])
@pytest.mark.parametrize("epsilon, iterations", [(0.05, 3), (0.5, 1), (0.1, 10)])
def test_matches_the_official_loop(num_samples, num_prototypes, epsilon, iterations):
    scores = random_scores(num_samples, num_prototypes, seed=num_samples + num_prototypes)
    expected = reference_sinkhorn(scores.numpy(), epsilon, iterations)
    torch.testing.assert_close(sinkhorn_knopp(scores, epsilon, iterations), torch.from_numpy(expected),
                               rtol=1e-10, atol=1e-12)


def test_every_sample_gets_a_distribution_and_prototypes_share_the_batch_equally():
    scores = random_scores(24, 6, seed=1)
    codes = sinkhorn_knopp(scores, epsilon=0.5, iterations=3)
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(24, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert (codes >= 0).all()
    # the column rescaling comes last, so the prototypes' totals converge with the iterations
    balanced = sinkhorn_knopp(scores, epsilon=0.5, iterations=200)
    torch.testing.assert_close(balanced.sum(dim=0), torch.full((6,), 24 / 6, dtype=torch.float64), rtol=1e-9, atol=0)
    torch.testing.assert_close(balanced.sum(dim=1), torch.ones(24, dtype=torch.float64), rtol=1e-12, atol=0)


def test_equipartition_spreads_identical_samples_over_the_prototypes():
    # all samples prefer prototype 0: a plain softmax would put them all there
    scores = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64).repeat(9, 1)
    codes = sinkhorn_knopp(scores, epsilon=0.05, iterations=100)
    torch.testing.assert_close(codes, torch.full((9, 3), 1 / 3, dtype=torch.float64))


def test_shifting_every_score_changes_nothing_and_small_epsilon_does_not_overflow():
    scores = random_scores(8, 5, seed=2)
    shifted = sinkhorn_knopp(scores + 50.0, 0.05)
    torch.testing.assert_close(shifted, sinkhorn_knopp(scores, 0.05), rtol=1e-12, atol=1e-12)
    # cosines in [0.5, 1]: exp(1 / 0.01) overflows float32 without the shift
    near_one = 0.75 + scores.float() / 4
    hard = sinkhorn_knopp(near_one, epsilon=0.01)
    torch.testing.assert_close(hard.double(), sinkhorn_knopp(near_one.double(), epsilon=0.01), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(hard.sum(dim=1), torch.ones(8), rtol=1e-5, atol=1e-5)


def test_no_gradient_and_float32_at_least_even_under_autocast():
    scores = random_scores(8, 5, seed=3, dtype=torch.float32).requires_grad_(True)
    assert not sinkhorn_knopp(scores).requires_grad
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = sinkhorn_knopp(scores.bfloat16())
    assert under_autocast.dtype == torch.float32
    exact = sinkhorn_knopp(scores.detach().bfloat16().double())
    torch.testing.assert_close(under_autocast.double(), exact, rtol=1e-5, atol=1e-7)
    assert sinkhorn_knopp(scores.double()).dtype == torch.float64


@pytest.mark.parametrize(
    "shape, kwargs, match",
    [((4,), {}, r"shape \[N, K\].*\(4,\)"), ((4, 3, 2), {}, r"\(4, 3, 2\)"),
     ((4, 3), {"epsilon": 0.0}, "epsilon > 0, got 0"), ((4, 3), {"iterations": 0}, "at least one iteration, got 0")],
)
def test_rejects_bad_input(shape, kwargs, match):
    with pytest.raises(ValueError, match=match):
        sinkhorn_knopp(torch.randn(shape), **kwargs)


def sinkhorn_on_one_rank(shards, epsilon, iterations):
    return sinkhorn_knopp(shards[dist.get_rank()], epsilon, iterations)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("shard_sizes", [(5, 5), (3, 7)])
def test_two_ranks_each_get_their_rows_of_the_global_batch_codes(tmp_path, shard_sizes):
    scores = random_scores(sum(shard_sizes), 6, seed=4)
    single = sinkhorn_knopp(scores, 0.05, 3)
    results = run_on_two_ranks(sinkhorn_on_one_rank, tmp_path, list(scores.split(shard_sizes)), 0.05, 3)
    torch.testing.assert_close(torch.cat(results), single, rtol=1e-10, atol=1e-12)
