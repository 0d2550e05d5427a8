"""NNCLR's loss: the nearest-neighbour lookup, and the symmetrised InfoNCE of neighbours against predictions."""

import pytest
import torch
import torch.distributed as dist

from ssl_lightning.losses.batch_info_nce import batch_info_nce
from ssl_lightning.losses.nearest_neighbour import nearest_neighbours

from helpers.gloo import assert_global_batch_value_and_gradients, run_on_two_ranks


def reference_nearest_neighbours(z, support):
    """For each row, the support row of largest cosine similarity, by loops (the first one on ties)."""
    rows = []
    for query in z:
        best, best_similarity = None, -float("inf")
        for candidate in support:
            similarity = (query * candidate).sum() / torch.sqrt((query * query).sum() * (candidate * candidate).sum())
            if similarity > best_similarity:
                best, best_similarity = candidate, similarity
        rows.append(best)
    return torch.stack(rows)


def reference_nnclr(z1, z2, p1, p2, support, temperature):
    """NNCLR eq. 2 with the predictor, symmetrised, written out per sample:
    l_i = -log( exp(NN(z_i) . p+_i / t) / sum_k exp(NN(z_i) . p+_k / t) ), on unit vectors."""

    def unit(x):
        return x / torch.sqrt((x * x).sum())

    def one_direction(z, p):
        neighbours = [unit(row) for row in reference_nearest_neighbours(z, support)]
        predictions = [unit(row) for row in p]
        total = 0.0
        for i, neighbour in enumerate(neighbours):
            logits = torch.stack([(neighbour * prediction).sum() / temperature for prediction in predictions])
            total = total - (logits[i] - torch.log(torch.exp(logits).sum()))
        return total / len(neighbours)

    return (one_direction(z1, p2) + one_direction(z2, p1)) / 2


def nnclr(z1, z2, p1, p2, support, temperature):
    """The loss as NNCLR's shared_step composes it."""
    neighbour1, neighbour2 = nearest_neighbours(z1, support), nearest_neighbours(z2, support)
    return (batch_info_nce(neighbour1, p2, temperature) + batch_info_nce(neighbour2, p1, temperature)) / 2


def random_inputs(n, dim, queue, seed):
    generator = torch.Generator().manual_seed(seed)
    z1, z2, p1, p2 = torch.randn(4, n, dim, generator=generator, dtype=torch.float64)
    support = torch.randn(queue, dim, generator=generator, dtype=torch.float64)
    return z1, z2, p1, p2, support


# ----------------------------------------------------------------- the lookup
@pytest.mark.parametrize("n, queue, dim", [(1, 1, 3), (5, 16, 4), (8, 64, 8)])
def test_lookup_matches_loop(n, queue, dim):
    z, _, _, _, support = random_inputs(n, dim, queue, seed=n + queue)
    torch.testing.assert_close(nearest_neighbours(z, support), reference_nearest_neighbours(z, support), rtol=0, atol=0)


def test_lookup_is_by_cosine_not_by_dot_product():
    support = torch.tensor([[10.0, 10.0], [1.0, 0.0]], dtype=torch.float64)
    z = torch.tensor([[1.0, 0.1]], dtype=torch.float64)  # dot product prefers row 0, the angle row 1
    torch.testing.assert_close(nearest_neighbours(z, support), support[1:])


def test_lookup_returns_stored_rows_and_a_member_finds_itself():
    _, _, _, _, support = random_inputs(1, 6, 32, seed=3)
    support = 5.0 * support  # not normalised: the stored rows come back as they are
    torch.testing.assert_close(nearest_neighbours(2.0 * support[7:12], support), support[7:12], rtol=0, atol=0)


def test_lookup_carries_no_gradient():
    z, _, _, _, support = random_inputs(4, 3, 8, seed=4)
    assert not nearest_neighbours(z.requires_grad_(True), support.requires_grad_(True)).requires_grad


def test_lookup_in_bfloat16_keeps_the_support_dtype():
    z, _, _, _, support = random_inputs(4, 8, 16, seed=5)
    found = nearest_neighbours(z.bfloat16(), support.float())
    assert found.dtype == torch.float32
    torch.testing.assert_close(found, reference_nearest_neighbours(z.bfloat16().double(), support).float())


@pytest.mark.parametrize("z_shape, support_shape", [((4, 3), (8, 2)), ((4,), (8, 4)), ((4, 3), (0, 3))])
def test_lookup_rejects_bad_shapes(z_shape, support_shape):
    with pytest.raises(ValueError, match="nearest_neighbours"):
        nearest_neighbours(torch.randn(z_shape), torch.randn(support_shape))


# ----------------------------------------------------------------- the loss
def nnclr_value_and_grads(loss_fn, z1, z2, p1, p2, support, temperature):
    p1, p2 = p1.clone().requires_grad_(True), p2.clone().requires_grad_(True)
    loss = loss_fn(z1, z2, p1, p2, support, temperature)
    return (loss, *torch.autograd.grad(loss, (p1, p2)))


@pytest.mark.parametrize("n, queue", [(1, 4), (4, 16), (8, 32)])
@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_loss_value_and_prediction_gradients_match_reference(n, queue, temperature):
    inputs = random_inputs(n, 5, queue, seed=10 * n + queue)
    actual = nnclr_value_and_grads(nnclr, *inputs, temperature)
    expected = nnclr_value_and_grads(reference_nnclr, *inputs, temperature)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


def test_identical_views_match_reference():
    z, _, p, _, support = random_inputs(6, 5, 16, seed=6)
    actual = nnclr_value_and_grads(nnclr, z, z.clone(), p, p.clone(), support, 0.1)
    expected = nnclr_value_and_grads(reference_nnclr, z, z.clone(), p, p.clone(), support, 0.1)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


def test_projections_get_no_gradient_through_the_neighbours():
    z1, z2, p1, p2, support = random_inputs(4, 5, 16, seed=7)
    z1.requires_grad_(True)
    assert not nnclr(z1, z2, p1, p2, support, 0.1).requires_grad


# ----------------------------------------------------------------- two ranks
def nnclr_on_one_rank(shards, support, temperature):
    """Worker: this rank's loss and its gradients with respect to its predictions (the support is shared)."""
    z1, z2, p1, p2 = shards[dist.get_rank()]
    p1, p2 = p1.clone().requires_grad_(True), p2.clone().requires_grad_(True)
    loss = nnclr(z1, z2, p1, p2, support, temperature)
    grad1, grad2 = torch.autograd.grad(loss, (p1, p2))
    return {"loss": loss.detach(), "grad_p1": grad1, "grad_p2": grad2}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("shard_sizes", [[3, 3], [2, 4]], ids=["equal", "uneven"])
def test_two_ranks_equal_one_process_on_the_global_batch(tmp_path, shard_sizes):
    z1, z2, p1, p2, support = random_inputs(sum(shard_sizes), 5, 16, seed=8)
    shards = list(zip(*(x.split(shard_sizes) for x in (z1, z2, p1, p2))))
    results = run_on_two_ranks(nnclr_on_one_rank, tmp_path, shards, support, 0.1)

    loss, grad_p1, grad_p2 = nnclr_value_and_grads(nnclr, z1, z2, p1, p2, support, 0.1)
    for name, grad in (("grad_p1", grad_p1), ("grad_p2", grad_p2)):
        per_rank = [{"loss": result["loss"], "grad": result[name]} for result in results]
        assert_global_batch_value_and_gradients(per_rank, loss, grad, shard_sizes)
