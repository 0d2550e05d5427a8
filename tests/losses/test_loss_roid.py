"""ROID's losses, weights, moving average and prior correction against plain float64 references written
from the benchmark's formulas (mariodoebler/test-time-adaptation, classification/utils/losses.py and
classification/methods/roid.py), and over two ranks against one process on the concatenated batch."""

import math

import pytest
import torch

from ssl_lightning.losses.roid import (
    batch_class_prior,
    certainty_diversity_weights,
    class_probs_ema_update,
    prior_correction,
    soft_likelihood_ratio,
)
from ssl_lightning.losses.tta_consistency import symmetric_cross_entropy  # ROID's consistency loss

from helpers.gloo import run_on_two_ranks


def softmax_row(row):
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


def reference_slr(logits, clip=0.99, eps=1e-5):
    """Row by row: -sum_c p_c log(p_c / (1 - p_c) + eps), p clipped at ``clip`` (no gradient where clipped)."""
    rows = []
    for row in logits:
        p = torch.softmax(row, dim=0)
        p = torch.where(p > clip, torch.full_like(p, clip), p)
        rows.append(-sum(p[c] * torch.log(p[c] / (1 - p[c]) + eps) for c in range(len(p))))
    return torch.stack(rows)


def reference_sce(x, x_ref, alpha=0.5):
    rows = []
    for a, b in zip(x, x_ref):
        log_a, log_b = a - torch.logsumexp(a, 0), b - torch.logsumexp(b, 0)
        rows.append(-(1 - alpha) * sum(log_b[c].exp() * log_a[c] for c in range(len(a)))
                    - alpha * sum(log_a[c].exp() * log_b[c] for c in range(len(a))))
    return torch.stack(rows)


def reference_weights(logits, ema, temperature):
    """The benchmark's loss_calculation weights, with plain Python numbers."""
    probs = [softmax_row(row) for row in logits.tolist()]
    ema = ema.tolist()
    div, cert = [], []
    for p in probs:
        dot = sum(a * b for a, b in zip(p, ema))
        cos = dot / (math.sqrt(sum(a * a for a in p)) * math.sqrt(sum(b * b for b in ema)))
        div.append(1 - cos)
        cert.append(sum(a * math.log(a) for a in p))
    div = [(d - min(div)) / (max(div) - min(div)) for d in div]
    cert = [(c - min(cert)) / (max(cert) - min(cert)) for c in cert]
    mean = sum(div) / len(div)
    keep = [d >= mean for d in div]
    weights = [math.exp(d * c / temperature) if k else 0.0 for d, c, k in zip(div, cert, keep)]
    return torch.tensor(weights, dtype=torch.float64), torch.tensor(keep)


def value_and_grads(fn, *inputs):
    inputs = [x.clone().requires_grad_(True) for x in inputs]
    value = fn(*inputs)
    grads = torch.autograd.grad(value.sum() if value.dim() else value, inputs)
    return value.detach(), grads


def logits_of(n, c, seed, scale=2.0):
    return scale * torch.randn(n, c, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("n, c, scale", [(6, 4, 2.0), (1, 3, 1.0), (5, 10, 8.0)])
def test_soft_likelihood_ratio_value_and_gradient_match_the_reference(n, c, scale):
    logits = logits_of(n, c, seed=n + c, scale=scale)
    weights = torch.rand(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    actual = value_and_grads(lambda x: soft_likelihood_ratio(x) * weights, logits)
    expected = value_and_grads(lambda x: reference_slr(x) * weights, logits)
    torch.testing.assert_close(actual[0], expected[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(actual[1][0], expected[1][0], rtol=1e-10, atol=1e-12)


def test_a_clipped_probability_passes_no_gradient():
    logits = torch.tensor([[12.0, 0.0, 0.0], [0.5, 0.0, -0.5]], dtype=torch.float64)  # p_0 of row 0 > 0.99
    p = torch.softmax(logits, dim=1)
    assert p[0, 0] > 0.99 and (p[1] < 0.99).all()
    value, (grad,) = value_and_grads(soft_likelihood_ratio, logits)
    torch.testing.assert_close(value, reference_slr(logits), rtol=1e-12, atol=1e-12)
    # Row 0's loss depends on the logits only through the two small, unclipped probabilities.
    probs = logits.clone().requires_grad_(True)
    q = torch.softmax(probs, 1)
    only_small = -(q[0, 1:] * torch.log(q[0, 1:] / (1 - q[0, 1:]) + 1e-5)).sum() - 0.99 * math.log(0.99 / 0.01 + 1e-5)
    torch.testing.assert_close(grad[0], torch.autograd.grad(only_small, probs)[0][0], rtol=1e-10, atol=1e-12)


def test_half_precision_logits_give_a_float32_loss():
    logits = logits_of(4, 3, seed=0).to(torch.bfloat16)
    assert soft_likelihood_ratio(logits).dtype == torch.float32
    assert symmetric_cross_entropy(logits, logits).dtype == torch.float32


@pytest.mark.parametrize("alpha", [0.5, 0.2])
def test_symmetric_cross_entropy_value_and_gradients_of_both_inputs_match_the_reference(alpha):
    x, x_ref = logits_of(5, 4, seed=3), logits_of(5, 4, seed=4)
    actual = value_and_grads(lambda a, b: symmetric_cross_entropy(a, b, alpha), x, x_ref)
    expected = value_and_grads(lambda a, b: reference_sce(a, b, alpha), x, x_ref)
    torch.testing.assert_close(actual[0], expected[0], rtol=1e-12, atol=1e-12)
    for got, want in zip(actual[1], expected[1]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_symmetric_cross_entropy_of_identical_predictions_is_their_entropy():
    x = logits_of(3, 5, seed=5)
    p = torch.softmax(x, 1)
    torch.testing.assert_close(symmetric_cross_entropy(x, x), -(p * p.log()).sum(1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("temperature", [1 / 3, 1.0])
def test_certainty_diversity_weights_match_the_benchmark_formula(temperature):
    logits = logits_of(8, 4, seed=7)
    ema = torch.tensor([0.1, 0.4, 0.3, 0.2], dtype=torch.float64)
    weights, keep = certainty_diversity_weights(logits.requires_grad_(True), ema, temperature)
    expected_weights, expected_keep = reference_weights(logits.detach(), ema, temperature)
    torch.testing.assert_close(weights, expected_weights, rtol=1e-12, atol=1e-12)
    assert torch.equal(keep, expected_keep) and 0 < int(keep.sum()) < 8
    assert not weights.requires_grad  # weights are constants of the loss, as under the benchmark's no_grad
    assert float(weights[keep].max()) == pytest.approx(max(expected_weights.tolist()))


def test_a_batch_of_one_or_of_equal_predictions_keeps_every_image_with_weight_one():
    ema = torch.full((3,), 1 / 3, dtype=torch.float64)
    for logits in (logits_of(1, 3, seed=0), logits_of(1, 3, seed=0).repeat(4, 1)):
        weights, keep = certainty_diversity_weights(logits, ema)
        assert keep.all() and torch.equal(weights, torch.ones(len(logits), dtype=torch.float64))


def test_the_class_probability_average_follows_its_formula():
    ema = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    logits = logits_of(6, 3, seed=2)
    prior, count = batch_class_prior(logits)
    rows = [softmax_row(row) for row in logits.tolist()]
    expected_prior = torch.tensor([sum(r[c] for r in rows) / 6 for c in range(3)], dtype=torch.float64)
    torch.testing.assert_close(prior, expected_prior, rtol=1e-12, atol=1e-12)
    assert float(count) == 6
    updated = class_probs_ema_update(ema, prior, momentum=0.9)
    torch.testing.assert_close(updated, 0.9 * ema + 0.1 * expected_prior, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(updated.sum(), torch.tensor(1.0, dtype=torch.float64))


def test_prior_correction_on_hand_made_probabilities():
    # Two images, three classes: prior [0.4, 0.5, 0.1]; gamma = max(1/2, 1/3) / 0.5 = 1;
    # smoothed prior (prior + 1) / (1 + 3) = [0.35, 0.375, 0.275].
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]], dtype=torch.float64)
    logits = probs.log()
    corrected = prior_correction(logits)
    torch.testing.assert_close(corrected, logits * torch.tensor([0.35, 0.375, 0.275], dtype=torch.float64),
                               rtol=1e-12, atol=1e-12)
    # Ten images, four classes: gamma = max(1/10, 1/4) / max(prior) = 0.25 / 0.7.
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1]] * 10, dtype=torch.float64)
    gamma = 0.25 / 0.7
    expected = [(p + gamma) / (1 + 4 * gamma) for p in (0.7, 0.1, 0.1, 0.1)]
    torch.testing.assert_close(prior_correction(probs.log()), probs.log() * torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-12, atol=1e-12)
    assert sum(expected) == pytest.approx(1.0)


def test_prior_correction_with_a_given_prior_and_batch_size():
    logits = logits_of(3, 4, seed=9)
    prior = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    gamma = max(1 / 50, 1 / 4) / 0.4
    expected = logits * ((prior + gamma) / (1 + 4 * gamma))
    torch.testing.assert_close(prior_correction(logits, prior, 50), expected, rtol=1e-12, atol=1e-12)
    gamma = max(1 / 2, 1 / 4) / 0.4
    torch.testing.assert_close(prior_correction(logits, prior, torch.tensor(2)),
                               logits * ((prior + gamma) / (1 + 4 * gamma)), rtol=1e-12, atol=1e-12)


def test_bad_input_is_refused_with_the_reason():
    logits = logits_of(4, 3, seed=0)
    with pytest.raises(ValueError, match=r"soft_likelihood_ratio expects logits of shape \[N, C\]"):
        soft_likelihood_ratio(logits[0])
    with pytest.raises(ValueError, match=r"C >= 2 classes, got \(4, 1\)"):
        soft_likelihood_ratio(logits[:, :1])
    with pytest.raises(ValueError, match=r"needs 0 < clip < 1 and eps > 0, got clip=1.0"):
        soft_likelihood_ratio(logits, clip=1.0)
    with pytest.raises(ValueError, match=r"logits and teacher_logits of the same 2-D shape"):
        symmetric_cross_entropy(logits, logits[:2])
    with pytest.raises(ValueError, match=r"0 <= alpha <= 1, got 2"):
        symmetric_cross_entropy(logits, logits, alpha=2)
    with pytest.raises(ValueError, match=r"class_probs_ema of shape \[C\] = \(3,\), got \(4,\)"):
        certainty_diversity_weights(logits, torch.ones(4))
    with pytest.raises(ValueError, match=r"temperature > 0, got 0"):
        certainty_diversity_weights(logits, torch.ones(3), temperature=0)
    with pytest.raises(ValueError, match=r"0 <= momentum <= 1, got 1.5"):
        class_probs_ema_update(torch.ones(3), torch.ones(3), momentum=1.5)
    with pytest.raises(ValueError, match=r"a prior of shape \[C\] = \(3,\), got \(2,\)"):
        prior_correction(logits, torch.ones(2), 4)
    with pytest.raises(ValueError, match=r"give batch_size"):
        prior_correction(logits, torch.ones(3))
    with pytest.raises(ValueError, match=r"batch_size >= 1, got 0"):
        prior_correction(logits, torch.ones(3), 0)


def _batch_statistics_on_one_rank(shards, ema):
    import torch.distributed as dist

    logits = shards[dist.get_rank()]
    weights, keep = certainty_diversity_weights(logits, ema)
    prior, count = batch_class_prior(logits)
    return {"weights": weights, "keep": keep, "prior": prior, "count": count, "corrected": prior_correction(logits)}


@pytest.mark.timeout(120)
def test_two_ranks_see_the_statistics_of_the_global_batch(tmp_path):
    # Uneven shards, and the global extremes of each weight on different ranks: per-rank statistics would differ.
    logits = logits_of(9, 4, seed=11)
    ema = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    results = run_on_two_ranks(_batch_statistics_on_one_rank, tmp_path, [logits[:4], logits[4:]], ema)
    weights, keep = certainty_diversity_weights(logits, ema)
    prior, count = batch_class_prior(logits)
    corrected = prior_correction(logits)
    assert not torch.equal(certainty_diversity_weights(logits[:4], ema)[0], weights[:4])
    for result, rows in zip(results, (slice(0, 4), slice(4, 9))):
        torch.testing.assert_close(result["weights"], weights[rows], rtol=1e-12, atol=1e-12)
        assert torch.equal(result["keep"], keep[rows])
        torch.testing.assert_close(result["prior"], prior, rtol=1e-12, atol=1e-15)
        assert float(result["count"]) == float(count) == 9
        torch.testing.assert_close(result["corrected"], corrected[rows], rtol=1e-12, atol=1e-12)
