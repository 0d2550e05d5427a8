import math

import pytest
import torch
import torch.distributed as dist

from ssl_lightning.losses.batch_info_nce import batch_info_nce

from helpers.gloo import WORLD_SIZE, assert_global_batch_value_and_gradients, run_on_two_ranks


def reference_batch_info_nce(queries, keys, temperature):
    """MoCo v3 eq. 1 written out query by query: key i is the positive of query i, every key a candidate."""
    u = [q / torch.sqrt((q * q).sum()) for q in queries]
    v = [k / torch.sqrt((k * k).sum()) for k in keys]
    total = 0.0
    for i in range(len(u)):
        numerator = torch.exp((u[i] * v[i]).sum() / temperature)
        denominator = sum(torch.exp((u[i] * v[j]).sum() / temperature) for j in range(len(v)))
        total = total - torch.log(numerator / denominator)
    return total / len(u)


def value_and_grads(loss_fn, queries, keys, *args):
    queries = queries.clone().requires_grad_(True)
    keys = keys.clone().requires_grad_(True)
    loss = loss_fn(queries, keys, *args)
    return (loss, *torch.autograd.grad(loss, (queries, keys)))


def assert_matches_reference(queries, keys, temperature):
    actual = value_and_grads(batch_info_nce, queries, keys, temperature)
    expected = value_and_grads(reference_batch_info_nce, queries, keys, temperature)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


def random_pairs(n, dim, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, n, dim, generator=generator, dtype=torch.float64)


@pytest.mark.parametrize("n, dim", [(2, 3), (5, 4), (8, 16)])
@pytest.mark.parametrize("temperature", [0.1, 0.2, 1.0, 2.0])
def test_value_and_gradient_match_reference(n, dim, temperature):
    queries, keys = random_pairs(n, dim, seed=n * 100 + dim)
    assert_matches_reference(queries, keys, temperature)


def test_identical_views_match_reference():
    z = torch.randn(6, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert_matches_reference(z, z.clone(), 0.2)


def test_single_pair_has_only_its_positive_and_zero_loss():
    queries, keys = random_pairs(1, 4, seed=1)
    assert_matches_reference(queries, keys, 0.2)
    assert batch_info_nce(queries, keys).item() == 0.0


def test_large_temperature_tends_to_uniform_softmax():
    queries, keys = random_pairs(7, 4, seed=2)
    torch.testing.assert_close(batch_info_nce(queries, keys, 1e4).item(), math.log(7), rtol=1e-3, atol=0)


def test_invariant_to_embedding_scale():
    queries, keys = random_pairs(5, 3, seed=3)
    torch.testing.assert_close(batch_info_nce(3.0 * queries, 0.25 * keys), batch_info_nce(queries, keys),
                               rtol=1e-12, atol=0)


def test_keys_without_gradient_give_the_queries_the_reference_gradient():
    # MoCo v3's keys come from the momentum encoder; NNCLR's queries (neighbours) from the queue.
    queries, keys = random_pairs(6, 5, seed=4)
    queries.requires_grad_(True)
    (grad,) = torch.autograd.grad(batch_info_nce(queries, keys, 0.2), queries)
    _, expected, _ = value_and_grads(reference_batch_info_nce, queries.detach(), keys, 0.2)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)


def test_bfloat16_inputs_give_float32_loss_close_to_float64():
    queries, keys = random_pairs(64, 32, seed=5)
    low = batch_info_nce(queries.bfloat16(), keys.bfloat16(), 0.1)
    assert low.dtype == torch.float32
    exact = batch_info_nce(queries.bfloat16().double(), keys.bfloat16().double(), 0.1)
    torch.testing.assert_close(low.double(), exact, rtol=1e-5, atol=0)


def test_autocast_does_not_lower_the_similarity_matmul():
    queries, keys = random_pairs(64, 32, seed=6).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = batch_info_nce(queries, keys, 0.1)
    exact = batch_info_nce(queries.double(), keys.double(), 0.1)
    torch.testing.assert_close(under_autocast.double(), exact, rtol=1e-5, atol=0)


@pytest.mark.parametrize(
    "shape1, shape2, match",
    [
        ((4, 3), (5, 3), r"queries and keys of the same 2-D shape.*\(4, 3\) and \(5, 3\)"),
        ((4, 3), (4, 2), r"same 2-D shape.*\(4, 3\) and \(4, 2\)"),
        ((4,), (4,), r"same 2-D shape.*\(4,\) and \(4,\)"),
    ],
)
def test_rejects_bad_shapes(shape1, shape2, match):
    with pytest.raises(ValueError, match=match):
        batch_info_nce(torch.randn(shape1), torch.randn(shape2))


def test_rejects_non_positive_temperature():
    with pytest.raises(ValueError, match="temperature > 0, got -1"):
        batch_info_nce(torch.randn(4, 3), torch.randn(4, 3), temperature=-1)


# ----------------------------------------------------------------- two ranks
def loss_and_both_gradients(shards, temperature):
    """Worker: this rank's loss, and its gradients with respect to its queries and its keys."""
    queries, keys = (x.clone().requires_grad_(True) for x in shards[dist.get_rank()])
    loss = batch_info_nce(queries, keys, temperature)
    grad_queries, grad_keys = torch.autograd.grad(loss, (queries, keys))
    return {"loss": loss.detach(), "grad_queries": grad_queries, "grad_keys": grad_keys}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("shard_sizes", [[3, 3], [2, 4]], ids=["equal", "uneven"])
def test_two_ranks_equal_one_process_on_the_global_batch(tmp_path, shard_sizes):
    queries, keys = random_pairs(sum(shard_sizes), 5, seed=7)
    shards = list(zip(queries.split(shard_sizes), keys.split(shard_sizes)))
    results = run_on_two_ranks(loss_and_both_gradients, tmp_path, shards, 0.2)
    assert len(results) == WORLD_SIZE

    loss, grad_queries, grad_keys = value_and_grads(batch_info_nce, queries, keys, 0.2)
    # The keys' gradient comes back through the gather from every rank's queries.
    for name, grad in (("grad_queries", grad_queries), ("grad_keys", grad_keys)):
        per_rank = [{"loss": result["loss"], "grad": result[name]} for result in results]
        assert_global_batch_value_and_gradients(per_rank, loss, grad, shard_sizes)
