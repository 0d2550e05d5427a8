import pytest
import torch

from ssl_lightning.losses import labelled_cross_entropy, soft_cross_entropy

from helpers.gloo import assert_global_batch_value_and_gradients, loss_on_one_rank, run_on_two_ranks


def reference_soft_cross_entropy(logits, targets, weights=None):
    """Row by row: l_i = -sum_c t_ic log p_ic with p = softmax; the weighted mean over rows."""
    weights = torch.ones(len(logits), dtype=logits.dtype) if weights is None else weights
    total, weight = 0.0, 0.0
    for row, target, w in zip(logits, targets, weights):
        log_p = row - torch.log(torch.exp(row).sum())
        total = total + w * -(target * log_p).sum()
        weight = weight + w
    return total / weight if weight > 0 else (logits * 0).sum()


def value_and_grad(loss_fn, logits, targets, weights):
    logits = logits.clone().requires_grad_(True)
    loss = loss_fn(logits, targets, weights)
    return loss, torch.autograd.grad(loss, logits)[0]


def random_targets(rows: int, classes: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(rows, classes, generator=generator, dtype=torch.float64).softmax(dim=1)


@pytest.mark.parametrize("weights", [None, [1.0, 0.0, 1.0, 0.5, 1.0], [0.0, 0.0, 0.0, 0.0, 2.0]])
def test_value_and_gradient_match_reference(weights):
    logits = torch.randn(5, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    targets = random_targets(5, 4, seed=1)
    weights = None if weights is None else torch.tensor(weights, dtype=torch.float64)
    actual = value_and_grad(soft_cross_entropy, logits, targets, weights)
    expected = value_and_grad(reference_soft_cross_entropy, logits, targets, weights)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


def test_one_hot_targets_give_the_hard_label_cross_entropy():
    logits, labels = torch.randn(6, 5, dtype=torch.float64), torch.tensor([0, 4, 1, 1, 3, 2])
    one_hot = torch.nn.functional.one_hot(labels, 5).double()
    torch.testing.assert_close(soft_cross_entropy(logits, one_hot), labelled_cross_entropy(logits, labels))


def test_no_weight_left_gives_zero_loss_and_zero_gradient():
    logits = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    loss = soft_cross_entropy(logits, random_targets(3, 4, seed=2), torch.zeros(3, dtype=torch.float64))
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(logits.grad) == 0


def test_half_precision_logits_give_a_float32_loss():
    logits = torch.randn(4, 3).to(torch.bfloat16)
    assert soft_cross_entropy(logits, random_targets(4, 3, seed=3).float()).dtype == torch.float32


@pytest.mark.parametrize("shapes", [((4, 3), (4, 2)), ((4, 3, 1), (4, 3, 1))])
def test_mismatched_shapes_are_named(shapes):
    with pytest.raises(ValueError, match="soft_cross_entropy expects logits and targets of the same 2-D shape"):
        soft_cross_entropy(torch.zeros(shapes[0]), torch.zeros(shapes[1]))


@pytest.mark.ddp
@pytest.mark.timeout(120)
def test_two_ranks_give_the_global_batch_value_and_gradients(tmp_path):
    # Uneven shards, and rank 0's rows all weigh 0: a per-rank mean would be wrong here.
    generator = torch.Generator().manual_seed(0)
    logits = [torch.randn(3, 4, generator=generator, dtype=torch.float64),
              torch.randn(5, 4, generator=generator, dtype=torch.float64)]
    targets = [random_targets(3, 4, seed=4), random_targets(5, 4, seed=5)]
    weights = [torch.zeros(3, dtype=torch.float64), torch.tensor([1.0, 0.0, 1.0, 1.0, 0.5], dtype=torch.float64)]
    results = run_on_two_ranks(loss_on_one_rank, tmp_path, soft_cross_entropy, list(zip(logits, targets, weights)))
    loss, grad = value_and_grad(reference_soft_cross_entropy, torch.cat(logits), torch.cat(targets), torch.cat(weights))
    assert_global_batch_value_and_gradients(results, loss, grad, [3, 5])
