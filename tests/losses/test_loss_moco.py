import math

import pytest
import torch

from ssl_lightning.losses.moco import info_nce_with_queue

from helpers.gloo import assert_global_batch_value_and_gradients, loss_on_one_rank, run_on_two_ranks


def unit(v):
    return v / torch.sqrt((v * v).sum())


def reference_info_nce(query, key, negatives, temperature, extra_negatives=None):
    """MoCo's eq. 1 query by query: -log of the positive's share of exp(similarity / t) over the
    positive, every queued negative and the query's own extra negatives."""
    total = 0.0
    for i in range(len(query)):
        q, positive = unit(query[i]), torch.exp((unit(query[i]) * unit(key[i])).sum() / temperature)
        others = list(negatives) + (list(extra_negatives[i]) if extra_negatives is not None else [])
        denominator = positive + sum(torch.exp((q * n).sum() / temperature) for n in others)
        total = total - torch.log(positive / denominator)
    return total / len(query)


def random_inputs(n, k, dim, seed, extra=0):
    generator = torch.Generator().manual_seed(seed)
    query, key = torch.randn(2, n, dim, generator=generator, dtype=torch.float64)
    negatives = torch.nn.functional.normalize(torch.randn(k, dim, generator=generator, dtype=torch.float64), dim=1)
    extra_negatives = None
    if extra:
        extra_negatives = torch.nn.functional.normalize(
            torch.randn(n, extra, dim, generator=generator, dtype=torch.float64), dim=2)
    return query, key, negatives, extra_negatives


def value_and_grads(loss_fn, query, key, negatives, temperature, extra_negatives=None):
    query, key = query.clone().requires_grad_(True), key.clone().requires_grad_(True)
    loss = loss_fn(query, key, negatives, temperature, extra_negatives)
    return (loss, *torch.autograd.grad(loss, (query, key)))


def assert_matches_reference(query, key, negatives, temperature, extra_negatives=None):
    actual = value_and_grads(info_nce_with_queue, query, key, negatives, temperature, extra_negatives)
    expected = value_and_grads(reference_info_nce, query, key, negatives, temperature, extra_negatives)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n, k, dim", [(1, 5, 3), (4, 7, 4), (8, 32, 16)])
@pytest.mark.parametrize("temperature", [0.07, 0.2, 1.0])
@pytest.mark.parametrize("extra", [0, 3])
def test_value_and_gradients_match_reference(n, k, dim, temperature, extra):
    query, key, negatives, extra_negatives = random_inputs(n, k, dim, seed=n * 100 + k, extra=extra)
    assert_matches_reference(query, key, negatives, temperature, extra_negatives)


def test_identical_views_match_reference():
    query, _, negatives, _ = random_inputs(6, 10, 5, seed=0)
    assert_matches_reference(query, query.clone(), negatives, 0.2)


def test_a_single_query_against_a_single_negative():
    query, key, negatives, _ = random_inputs(1, 1, 4, seed=1)
    assert_matches_reference(query, key, negatives, 0.2)
    # a two-way softmax: -log sigmoid((q.k - q.n) / t)
    q, k, n = unit(query[0]), unit(key[0]), negatives[0]
    expected = -torch.nn.functional.logsigmoid(((q * k).sum() - (q * n).sum()) / 0.2)
    torch.testing.assert_close(info_nce_with_queue(query, key, negatives, 0.2), expected)


def test_large_temperature_tends_to_uniform_softmax():
    query, key, negatives, extra = random_inputs(5, 9, 4, seed=2, extra=2)
    loss = info_nce_with_queue(query, key, negatives, 1e5, extra)
    torch.testing.assert_close(loss.item(), math.log(1 + 9 + 2), rtol=1e-4, atol=0)


def test_queries_and_keys_are_normalised_but_negatives_are_used_as_given():
    query, key, negatives, _ = random_inputs(4, 6, 3, seed=3)
    reference = info_nce_with_queue(query, key, negatives)
    torch.testing.assert_close(info_nce_with_queue(3.0 * query, 0.5 * key, negatives), reference, rtol=1e-12, atol=0)
    # documented: the queue is not re-normalised (it holds unit keys), so scaling it changes the loss
    assert not torch.allclose(info_nce_with_queue(query, key, 2.0 * negatives), reference)


def test_bfloat16_inputs_give_float32_loss_and_autocast_does_not_lower_the_logits():
    query, key, negatives, extra = random_inputs(16, 64, 32, seed=4, extra=4)
    low = info_nce_with_queue(query.bfloat16(), key.bfloat16(), negatives.float(), 0.2, extra.float())
    assert low.dtype == torch.float32
    exact = info_nce_with_queue(query.bfloat16().double(), key.bfloat16().double(), negatives.float().double(), 0.2,
                                extra.float().double())
    torch.testing.assert_close(low.double(), exact, rtol=1e-5, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = info_nce_with_queue(query.float(), key.float(), negatives.float(), 0.2, extra.float())
    torch.testing.assert_close(under_autocast.double(), info_nce_with_queue(query, key, negatives, 0.2, extra),
                               rtol=1e-5, atol=0)


@pytest.mark.parametrize(
    "query, key, negatives, extra, match",
    [
        ((4, 3), (5, 3), (6, 3), None, r"same 2-D shape.*\(4, 3\) and \(5, 3\)"),
        ((4, 3), (4, 3), (6, 2), None, r"negatives of shape \[K, 3\].*\(6, 2\)"),
        ((4, 3), (4, 3), (3,), None, r"negatives of shape \[K, 3\].*\(3,\)"),
        ((4, 3), (4, 3), (6, 3), (3, 2, 3), r"extra_negatives of shape \[4, S, 3\].*\(3, 2, 3\)"),
        ((4, 3), (4, 3), (6, 3), (4, 3), r"extra_negatives of shape \[4, S, 3\].*\(4, 3\)"),
    ],
)
def test_rejects_bad_shapes(query, key, negatives, extra, match):
    extra = None if extra is None else torch.randn(extra)
    with pytest.raises(ValueError, match=match):
        info_nce_with_queue(torch.randn(query), torch.randn(key), torch.randn(negatives), 0.2, extra)


def test_rejects_non_positive_temperature():
    with pytest.raises(ValueError, match="temperature > 0, got 0"):
        info_nce_with_queue(torch.randn(4, 3), torch.randn(4, 3), torch.randn(6, 3), temperature=0)


@pytest.mark.ddp
@pytest.mark.timeout(120)
@pytest.mark.parametrize("extra", [0, 2])
def test_two_ranks_give_the_global_batch_value_and_gradients(tmp_path, extra):
    # Uneven shards: a mean of the per-rank means would weigh rank 0's three queries too much.
    query, key, negatives, extra_negatives = random_inputs(8, 12, 5, seed=5, extra=extra)
    sizes = [3, 5]
    queries, keys = query.split(sizes), key.split(sizes)
    extras = extra_negatives.split(sizes) if extra else [None, None]
    # the queue is the same on every rank; each rank has its own queries' extra negatives
    shards = [(q, k, negatives, 0.2, e) for q, k, e in zip(queries, keys, extras)]
    results = run_on_two_ranks(loss_on_one_rank, tmp_path, info_nce_with_queue, shards)
    query = query.clone().requires_grad_(True)
    loss = reference_info_nce(query, key, negatives, 0.2, extra_negatives)
    (grad,) = torch.autograd.grad(loss, query)
    assert_global_batch_value_and_gradients(results, loss.detach(), grad, sizes)
