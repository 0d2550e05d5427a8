"""MYOW's mined views: the neighbour lookup (never the sample itself) and the across-sample loss."""

import pytest
import torch

from ssl_lightning.losses.myow import mine_views, mined_view_loss

from helpers.gloo import assert_global_batch_value_and_gradients, loss_on_one_rank, run_on_two_ranks


def cosine(a, b):
    return (a * b).sum() / torch.sqrt((a * a).sum() * (b * b).sum())


def reference_nearest(query, pool, k, self_index):
    """For each query, the k pool rows of largest cosine similarity other than its own, by loops."""
    rows = []
    for i, q in enumerate(query):
        scored = [(cosine(q, candidate).item(), j) for j, candidate in enumerate(pool) if j != self_index[i]]
        rows.append([j for _, j in sorted(scored, reverse=True)[:k]])
    return rows


def reference_mined_view_loss(prediction, query, pool_keys, pool_targets):
    """The official MYOW mined loss with k = 1, sample by sample: 2 - 2 cos(q_m(x_i), v'(x_n(i)))."""
    neighbours = reference_nearest(query, pool_keys, 1, list(range(len(query))))
    total = 0.0
    for p, (n,) in zip(prediction, neighbours):
        target = pool_targets[n]
        difference = p / torch.sqrt((p * p).sum()) - target / torch.sqrt((target * target).sum())
        total = total + (difference * difference).sum()
    return total / len(prediction)


def random_inputs(n, dim, width, seed):
    generator = torch.Generator().manual_seed(seed)
    prediction = torch.randn(n, width, generator=generator, dtype=torch.float64)
    query, pool_keys = torch.randn(2, n, dim, generator=generator, dtype=torch.float64)
    pool_targets = torch.randn(n, width, generator=generator, dtype=torch.float64)
    return prediction, query, pool_keys, pool_targets


def value_and_grad(loss_fn, prediction, *rest):
    prediction = prediction.clone().requires_grad_(True)
    loss = loss_fn(prediction, *rest)
    return loss, torch.autograd.grad(loss, prediction)[0]


# ----------------------------------------------------------------- mining
@pytest.mark.parametrize("n, pool_size, dim", [(1, 2, 3), (5, 5, 4), (8, 32, 8)])
def test_nearest_matches_loop(n, pool_size, dim):
    generator = torch.Generator().manual_seed(n + pool_size)
    query = torch.randn(n, dim, generator=generator, dtype=torch.float64)
    pool = torch.randn(pool_size, dim, generator=generator, dtype=torch.float64)
    own = torch.arange(n)
    expected = [row[0] for row in reference_nearest(query, pool, 1, own.tolist())]
    assert mine_views(query, pool, 1, self_index=own).tolist() == expected


def test_never_mines_itself_even_when_it_is_the_closest():
    pool = torch.randn(6, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    own = torch.arange(6)
    for k in (1, 3, 5):
        for _ in range(20):
            mined = mine_views(pool.clone(), pool, k, self_index=own)  # each query is its own pool row
            assert (mined != own).all()


def test_a_pool_of_two_mines_the_other_sample():
    pool = torch.randn(2, 3, dtype=torch.float64)
    assert mine_views(pool, pool, 1, self_index=torch.arange(2)).tolist() == [1, 0]


def test_without_self_index_a_member_finds_itself():
    pool = torch.randn(7, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert mine_views(3.0 * pool, pool, 1).tolist() == list(range(7))


def test_draws_uniformly_among_the_k_nearest():
    generator = torch.Generator().manual_seed(2)
    query = torch.randn(4, 6, generator=generator, dtype=torch.float64)
    pool = torch.randn(16, 6, generator=generator, dtype=torch.float64)
    own = torch.tensor([0, 5, 9, 15])
    allowed = reference_nearest(query, pool, 3, own.tolist())
    torch.manual_seed(0)
    draws = torch.stack([mine_views(query, pool, 3, self_index=own) for _ in range(300)])
    for i, row in enumerate(allowed):
        assert set(draws[:, i].tolist()) == set(row)  # every one of the k is drawn, nothing else


def test_lookup_is_by_cosine_not_by_dot_product():
    pool = torch.tensor([[10.0, 10.0], [1.0, 0.0]], dtype=torch.float64)
    assert mine_views(torch.tensor([[1.0, 0.1]], dtype=torch.float64), pool, 1).tolist() == [1]


def test_lookup_in_bfloat16_matches_float64():
    generator = torch.Generator().manual_seed(3)
    query, pool = torch.randn(2, 8, 16, generator=generator, dtype=torch.float64)
    own = torch.arange(8)
    expected = [row[0] for row in reference_nearest(query.bfloat16().double(), pool.bfloat16().double(), 1, own.tolist())]
    assert mine_views(query.bfloat16(), pool.bfloat16(), 1, self_index=own).tolist() == expected


@pytest.mark.parametrize(
    "query_shape, pool_shape, k, self_index, match",
    [((4, 3), (8, 2), 1, None, "same width"), ((4,), (8, 4), 1, None, "same width"),
     ((2, 3), (2, 3), 2, torch.arange(2), r"k=2 nearest of 1 candidates"), ((2, 3), (5, 3), 0, None, "k=0")],
)
def test_mining_rejects_bad_input(query_shape, pool_shape, k, self_index, match):
    with pytest.raises(ValueError, match=match):
        mine_views(torch.randn(query_shape), torch.randn(pool_shape), k, self_index=self_index)


def test_a_batch_of_one_has_nothing_to_mine():
    with pytest.raises(ValueError, match="1 <= k <= 0"):
        mined_view_loss(*random_inputs(1, 3, 4, seed=0))


# ----------------------------------------------------------------- the loss
@pytest.mark.parametrize("n", [2, 5, 12])
def test_loss_value_and_gradient_match_reference(n):
    inputs = random_inputs(n, 6, 4, seed=n)
    actual = value_and_grad(mined_view_loss, *inputs)
    expected = value_and_grad(reference_mined_view_loss, *inputs)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


def test_identical_views_still_predict_another_sample():
    prediction, query, _, pool_targets = random_inputs(6, 5, 5, seed=4)
    # The pool is the query itself: each sample is its own nearest row, and must not be mined.
    actual = value_and_grad(mined_view_loss, prediction, query, query.clone(), pool_targets)
    expected = value_and_grad(reference_mined_view_loss, prediction, query, query.clone(), pool_targets)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


def test_only_the_prediction_gets_a_gradient():
    prediction, query, pool_keys, pool_targets = (x.requires_grad_(True) for x in random_inputs(4, 3, 3, seed=5))
    mined_view_loss(prediction, query, pool_keys, pool_targets).backward()
    assert prediction.grad is not None and prediction.grad.abs().sum() > 0
    assert query.grad is None and pool_keys.grad is None and pool_targets.grad is None


def test_rows_must_agree():
    prediction, query, pool_keys, pool_targets = random_inputs(4, 3, 3, seed=6)
    with pytest.raises(ValueError, match="same number of rows"):
        mined_view_loss(prediction, query, pool_keys[:3], pool_targets)


# ----------------------------------------------------------------- two ranks
@pytest.mark.timeout(120)
@pytest.mark.parametrize("shard_sizes", [[3, 3], [2, 4]], ids=["equal", "uneven"])
def test_two_ranks_equal_one_process_on_the_global_batch(tmp_path, shard_sizes):
    inputs = random_inputs(sum(shard_sizes), 5, 4, seed=7)
    shards = list(zip(*(x.split(shard_sizes) for x in inputs)))
    results = run_on_two_ranks(loss_on_one_rank, tmp_path, mined_view_loss, shards)
    loss, grad = value_and_grad(mined_view_loss, *inputs)
    assert_global_batch_value_and_gradients(results, loss, grad, shard_sizes)
