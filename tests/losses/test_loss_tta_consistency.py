"""CoTTA's and RMT's consistency losses against plain float64 references: value and gradient."""

import pytest
import torch
import torch.nn.functional as F

from ssl_lightning.losses.tta_consistency import (
    prototype_contrastive_loss,
    symmetric_cross_entropy,
    teacher_cross_entropy,
)


def reference_sce(logits, teacher_logits, alpha):
    """Row by row, class by class: -(1 - alpha) sum q log p - alpha sum p log q."""
    rows = []
    for s, t in zip(logits, teacher_logits):
        p = [torch.exp(v) / torch.exp(s).sum() for v in s]
        q = [torch.exp(v) / torch.exp(t).sum() for v in t]
        to_teacher = -sum(q_c * torch.log(p_c) for p_c, q_c in zip(p, q))
        to_student = -sum(p_c * torch.log(q_c) for p_c, q_c in zip(p, q))
        rows.append((1 - alpha) * to_teacher + alpha * to_student)
    return torch.stack(rows)


def reference_contrastive(prototypes, features, augmented, temperature):
    """Anchor by anchor: the mean over its two positives of -log(exp(sim/T) / sum over all other rows)."""
    rows = torch.cat([prototypes, features, augmented])
    z = [row / torch.sqrt((row * row).sum()) for row in rows]
    n, total = len(features), 0.0
    for a in range(3 * n):
        others = [b for b in range(3 * n) if b != a]
        denominator = sum(torch.exp((z[a] * z[b]).sum() / temperature) for b in others)
        positives = [b for b in others if b % n == a % n]
        assert len(positives) == 2
        total = total + sum(-torch.log(torch.exp((z[a] * z[p]).sum() / temperature) / denominator)
                            for p in positives) / 2
    return total / (3 * n)


def benchmark_contrastive(prototypes, features, augmented, temperature):
    """The benchmark's RMT.contrastive_loss (SupCon, contrast_mode 'all', no labels), identity projector."""
    stacked = torch.stack([prototypes, features, augmented], dim=1)  # [N, 3, D]
    n = stacked.shape[0]
    mask = torch.eye(n, dtype=stacked.dtype)
    contrast = F.normalize(torch.cat(torch.unbind(stacked, dim=1), dim=0), p=2, dim=1)
    logits = contrast @ contrast.T / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    mask = mask.repeat(3, 3)
    logits_mask = torch.scatter(torch.ones_like(mask), 1, torch.arange(3 * n).view(-1, 1), 0)
    mask = mask * logits_mask
    log_prob = logits - torch.log((torch.exp(logits) * logits_mask).sum(1, keepdim=True))
    return -((mask * log_prob).sum(1) / mask.sum(1)).view(3, n).mean()


def value_and_grads(loss_fn, *inputs, **kwargs):
    inputs = [x.clone().requires_grad_(True) for x in inputs]
    loss = loss_fn(*inputs, **kwargs)
    total = loss.sum()
    return (loss, *torch.autograd.grad(total, inputs))


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("alpha", [0.5, 0.0, 0.3, 1.0])
@pytest.mark.parametrize("rows", [1, 5])
def test_symmetric_cross_entropy_value_and_gradients_match_reference(alpha, rows):
    logits, teacher = randn(rows, 4, seed=0) * 2, randn(rows, 4, seed=1) * 2
    actual = value_and_grads(symmetric_cross_entropy, logits, teacher, alpha=alpha)
    expected = value_and_grads(reference_sce, logits, teacher, alpha=alpha)
    assert actual[0].shape == (rows,)
    for a, e in zip(actual, expected):  # per-image values, d/d student, d/d teacher
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


def test_the_benchmark_weights_are_half_and_half():
    logits, teacher = randn(6, 3, seed=2), randn(6, 3, seed=3)
    p, q = logits.softmax(1), teacher.softmax(1)
    benchmark = -0.5 * (q * logits.log_softmax(1)).sum(1) - 0.5 * (p * teacher.log_softmax(1)).sum(1)
    torch.testing.assert_close(symmetric_cross_entropy(logits, teacher), benchmark, rtol=1e-12, atol=1e-12)


def test_teacher_cross_entropy_is_the_student_cross_entropy_to_the_teachers_softmax():
    logits, teacher = randn(5, 4, seed=4), randn(5, 4, seed=5)
    actual = value_and_grads(teacher_cross_entropy, logits, teacher)
    expected = value_and_grads(reference_sce, logits, teacher, alpha=0.0)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


def test_identical_predictions_give_the_entropy_and_saturated_ones_stay_finite():
    logits = randn(4, 5, seed=6)
    entropy = -(logits.softmax(1) * logits.log_softmax(1)).sum(1)
    torch.testing.assert_close(symmetric_cross_entropy(logits, logits.clone()), entropy, rtol=1e-12, atol=1e-12)
    saturated = torch.tensor([[1000.0, -1000.0, 0.0], [-1000.0, 1000.0, 0.0]], requires_grad=True)
    for alpha in (0.0, 0.5):
        loss = symmetric_cross_entropy(saturated, saturated.detach().flip(0), alpha=alpha)
        loss.sum().backward()
        assert torch.isfinite(loss).all() and torch.isfinite(saturated.grad).all()


def test_half_precision_inputs_give_float32():
    logits = randn(3, 4, seed=7).to(torch.bfloat16)
    assert symmetric_cross_entropy(logits, logits).dtype == torch.float32
    assert prototype_contrastive_loss(logits, logits, logits).dtype == torch.float32


@pytest.mark.parametrize("rows", [1, 2, 6])
@pytest.mark.parametrize("temperature", [0.1, 1.0])
def test_prototype_contrastive_loss_value_and_gradients_match_references(rows, temperature):
    inputs = [randn(rows, 5, seed=10 + k) for k in range(3)]
    actual = value_and_grads(prototype_contrastive_loss, *inputs, temperature=temperature)
    for reference in (reference_contrastive, benchmark_contrastive):
        expected = value_and_grads(reference, *inputs, temperature=temperature)
        for a, e in zip(actual, expected):  # the value, d/d prototypes, d/d features, d/d augmented
            torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-11)


def test_prototype_contrastive_loss_ignores_the_scale_of_each_row():
    inputs = [randn(4, 3, seed=20 + k) for k in range(3)]
    scaled = [x * torch.rand(4, 1, dtype=torch.float64).add(0.5) * 7 for x in inputs]
    torch.testing.assert_close(prototype_contrastive_loss(*inputs), prototype_contrastive_loss(*scaled))


def test_aligned_views_score_lower_than_scattered_ones():
    aligned = randn(4, 8, seed=30)
    scattered = [randn(4, 8, seed=31 + k) for k in range(3)]
    assert prototype_contrastive_loss(aligned, aligned, aligned) < prototype_contrastive_loss(*scattered)


def test_bad_inputs_are_refused():
    x = torch.zeros(3, 4)
    with pytest.raises(ValueError, match=r"symmetric_cross_entropy expects logits and teacher_logits of the same 2-D"):
        symmetric_cross_entropy(x, torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r"needs 0 <= alpha <= 1, got 1.5"):
        symmetric_cross_entropy(x, x, alpha=1.5)
    with pytest.raises(ValueError, match=r"prototype_contrastive_loss expects features and augmented of the same"):
        prototype_contrastive_loss(x, x, torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"needs temperature > 0, got 0"):
        prototype_contrastive_loss(x, x, x, temperature=0)
