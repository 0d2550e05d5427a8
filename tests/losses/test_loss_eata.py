"""EATA's filters, sample weights, weighted entropy, probability average and Fisher regulariser against
plain float64 references (loops over samples and elements, the paper's formulas, the benchmark's
``update_model_probs``), the edge cases, and two ranks against one process."""

import math

import pytest
import torch

from ssl_lightning.losses.eata import (
    eata_entropy_loss,
    eata_sample_weights,
    fisher_penalty,
    non_redundant_samples,
    reliable_samples,
    update_average_probs,
)

from helpers.gloo import WORLD_SIZE, run_on_two_ranks
from helpers.tta import plain_entropy_rows as entropy_rows

E0 = 0.4 * math.log(3)


def reference_weighted_entropy(logits, selected, margin):
    """sum_{i selected} E_i / exp(E_i - E0) / #selected, with the weight a constant (computed from a
    detached entropy), written as a loop."""
    entropy = entropy_rows(logits)
    total, count = 0.0, 0
    for i in range(len(logits)):
        if selected[i]:
            weight = 1.0 / math.exp(float(entropy[i].detach()) - margin)
            total = total + weight * entropy[i]
            count += 1
    return total / max(count, 1)


def hand_made_logits():
    # entropies: ~0 (certain), ln 3 (uniform), and two in between, on either side of E0 = 0.44
    return torch.tensor([[12.0, 0.0, 0.0], [0.0, 0.0, 0.0], [3.0, 0.0, 0.0], [1.0, 0.5, 0.0]], dtype=torch.float64)


def test_reliable_samples_are_exactly_those_below_the_margin():
    logits = hand_made_logits()
    entropy = entropy_rows(logits)
    expected = [float(e) < E0 for e in entropy]
    assert expected == [True, False, True, False]  # the hand-made rows straddle the margin
    assert reliable_samples(entropy, E0).tolist() == expected


def test_non_redundant_samples_are_exactly_those_with_a_small_cosine_to_the_average():
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.34, 0.33, 0.33], [0.05, 0.05, 0.9]])
    average = torch.tensor([0.7, 0.2, 0.1])
    d_margin = 0.6
    expected = []
    for row in probs:
        dot = sum(float(row[c]) * float(average[c]) for c in range(3))
        cosine = dot / math.sqrt(sum(float(v) ** 2 for v in row)) / math.sqrt(sum(float(v) ** 2 for v in average))
        expected.append(abs(cosine) < d_margin)
    assert expected == [False, True, False, True]
    assert non_redundant_samples(probs, average, torch.tensor(True), d_margin).tolist() == expected
    # no average yet (first batch, or after a reset): every sample passes
    assert non_redundant_samples(probs, average, torch.tensor(False), d_margin).tolist() == [True] * 4


def test_sample_weights_are_one_over_exp_of_entropy_minus_margin_and_detached():
    entropy = entropy_rows(hand_made_logits()).requires_grad_(True)
    weights = eata_sample_weights(entropy, E0)
    expected = torch.tensor([1.0 / math.exp(float(e) - E0) for e in entropy.detach()], dtype=torch.float64)
    torch.testing.assert_close(weights, expected, rtol=1e-12, atol=0)
    assert not weights.requires_grad  # a constant of the step, as the benchmark's .detach()


@pytest.mark.parametrize("mask", [[1, 1, 1, 1, 1], [1, 0, 1, 0, 0], [0, 0, 0, 0, 1]])
def test_weighted_entropy_value_and_gradient_match_the_loop(mask):
    logits = 2 * torch.randn(5, 3, generator=torch.Generator().manual_seed(sum(mask)), dtype=torch.float64)
    selected = torch.tensor(mask, dtype=torch.bool)
    leaf = logits.clone().requires_grad_(True)
    loss, count = eata_entropy_loss(entropy_rows(leaf), selected, E0)
    (grad,) = torch.autograd.grad(loss, leaf)
    ref_leaf = logits.clone().requires_grad_(True)
    expected = reference_weighted_entropy(ref_leaf, selected, E0)
    (expected_grad,) = torch.autograd.grad(expected, ref_leaf)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)
    assert count == sum(mask)
    # the weight carries no gradient: differentiating through it gives another (wrong) gradient
    through = logits.clone().requires_grad_(True)
    entropy = entropy_rows(through)
    undetached = (torch.exp(E0 - entropy) * entropy * selected).sum() / selected.sum()
    (through_grad,) = torch.autograd.grad(undetached, through)
    assert not torch.allclose(through_grad, grad)
    assert (grad[~selected] == 0).all()


def test_nothing_selected_gives_zero_loss_and_zero_gradient_and_ignores_non_finite_rows():
    entropy = torch.tensor([0.1, float("inf"), 0.3], dtype=torch.float64, requires_grad=True)
    loss, count = eata_entropy_loss(entropy, torch.zeros(3, dtype=torch.bool), E0)
    (grad,) = torch.autograd.grad(loss, entropy)
    assert loss == 0 and count == 0 and (grad == 0).all()
    loss, _ = eata_entropy_loss(entropy, torch.tensor([True, False, True]), E0)
    assert torch.isfinite(loss)


def reference_update_model_probs(current, new_probs):
    """The benchmark's update_model_probs (None: no average yet)."""
    if current is None:
        return None if len(new_probs) == 0 else new_probs.mean(0)
    if len(new_probs) == 0:
        return current
    return 0.9 * current + (1 - 0.9) * new_probs.mean(0)


def test_average_probs_follow_the_benchmarks_update_over_a_stream():
    generator = torch.Generator().manual_seed(0)
    average, has = torch.zeros(4, dtype=torch.float64), torch.tensor(False)
    reference = None
    masks = [[0, 0, 0], [1, 0, 1], [0, 0, 0], [1, 1, 1], [0, 1, 0]]  # nothing selected first: still no average
    for mask in masks:
        probs = torch.softmax(torch.randn(3, 4, generator=generator, dtype=torch.float64), dim=1)
        selected = torch.tensor(mask, dtype=torch.bool)
        average, has = update_average_probs(average, has, probs, selected)
        reference = reference_update_model_probs(reference, probs[selected])
        assert bool(has) == (reference is not None)
        if reference is not None:
            torch.testing.assert_close(average, reference, rtol=1e-12, atol=1e-15)


def test_fisher_penalty_value_and_gradient_match_the_elementwise_sum():
    generator = torch.Generator().manual_seed(1)
    params = [torch.randn(3, 2, generator=generator, dtype=torch.float64), torch.randn(4, generator=generator,
                                                                                        dtype=torch.float64)]
    fisher = [torch.rand(p.shape, generator=generator, dtype=torch.float64) for p in params]
    anchors = [torch.randn(p.shape, generator=generator, dtype=torch.float64) for p in params]
    leaves = [p.clone().requires_grad_(True) for p in params]
    value = fisher_penalty(leaves, fisher, anchors, alpha=2.5)
    grads = torch.autograd.grad(value, leaves)
    expected, expected_grads = 0.0, []
    for p, f, a in zip(params, fisher, anchors):
        g = torch.zeros_like(p)
        for index in range(p.numel()):
            diff = float(p.reshape(-1)[index]) - float(a.reshape(-1)[index])
            expected += 2.5 * float(f.reshape(-1)[index]) * diff**2
            g.reshape(-1)[index] = 2 * 2.5 * float(f.reshape(-1)[index]) * diff
        expected_grads.append(g)
    assert value.item() == pytest.approx(expected, rel=1e-12)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-14)
    # at the anchors the regulariser and its gradient vanish
    assert fisher_penalty(anchors, fisher, anchors, alpha=2.5) == 0


def test_bad_inputs_are_refused_with_the_shape_named():
    entropy = torch.rand(4)
    with pytest.raises(ValueError, match=r"shape \[N\]"):
        reliable_samples(torch.rand(4, 2), E0)
    with pytest.raises(ValueError, match="bool mask"):
        eata_entropy_loss(entropy, torch.ones(4), E0)
    with pytest.raises(ValueError, match="bool mask"):
        eata_entropy_loss(entropy, torch.ones(3, dtype=torch.bool), E0)
    with pytest.raises(ValueError, match=r"average_probs \[C\]"):
        non_redundant_samples(torch.rand(4, 3), torch.rand(4), torch.tensor(True), 0.4)
    with pytest.raises(ValueError, match="update_average_probs"):
        update_average_probs(torch.rand(3), torch.tensor(True), torch.rand(4, 3), torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="one Fisher tensor and one anchor per parameter"):
        fisher_penalty([torch.rand(2)], [], [torch.rand(2)], 1.0)
    with pytest.raises(ValueError, match="must match"):
        fisher_penalty([torch.rand(2)], [torch.rand(3)], [torch.rand(2)], 1.0)


def _two_rank_worker(logits, selected, probs):
    import torch.distributed as dist

    rank = dist.get_rank()
    bounds = [0, 2, len(logits)]  # uneven shards: 2 and 4 rows
    part = slice(bounds[rank], bounds[rank + 1])
    leaf = logits[part].clone().requires_grad_(True)
    loss, count = eata_entropy_loss(entropy_rows(leaf), selected[part], E0)
    (grad,) = torch.autograd.grad(loss, leaf)
    average, has = update_average_probs(torch.full((3,), 1 / 3, dtype=torch.float64), torch.tensor(True),
                                        probs[part], selected[part])
    return {"loss": loss.detach(), "count": count, "grad": grad, "average": average, "has": has}


@pytest.mark.timeout(120)
def test_two_ranks_give_the_global_batch_loss_gradient_and_average(tmp_path):
    generator = torch.Generator().manual_seed(3)
    logits = 2 * torch.randn(6, 3, generator=generator, dtype=torch.float64)
    selected = torch.tensor([False, False, True, True, False, True])  # rank 0 selects nothing
    probs = torch.softmax(logits, dim=1)
    results = run_on_two_ranks(_two_rank_worker, tmp_path, logits, selected, probs)
    leaf = logits.clone().requires_grad_(True)
    loss, count = eata_entropy_loss(entropy_rows(leaf), selected, E0)
    (grad,) = torch.autograd.grad(loss, leaf)
    average, _ = update_average_probs(torch.full((3,), 1 / 3, dtype=torch.float64), torch.tensor(True), probs, selected)
    for rank, result in enumerate(results):
        part = slice(*[(0, 2), (2, 6)][rank])
        torch.testing.assert_close(result["loss"], loss.detach(), rtol=1e-12, atol=1e-14)
        assert result["count"] == count == 3
        # each rank holds WORLD_SIZE x its rows' share: the mean over ranks is the one-process gradient
        torch.testing.assert_close(result["grad"], WORLD_SIZE * grad[part], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(result["average"], average, rtol=1e-12, atol=1e-15)
