"""NKD's terms (Yang et al. 2023) against a plain reference and against the official NKDLoss written
out (before and after its fix of the non-target mask): values and gradients in float64, unlabelled
rows masked, and the edge cases (a certain teacher, equal logits, one class, temperature 1 against 4)."""

import math

import pytest
import torch
import torch.nn.functional as F

from ssl_lightning.losses.nkd import nkd_loss, nkd_terms


def reference_terms(student, teacher, labels, temperature, keep_target=False):
    """Row by row over the labelled rows: -q_y log p_y, and -lambda^2 sum over the non-target classes of
    N(q^lambda) log N(p^lambda), N dividing by the non-target mass (all classes with keep_target)."""
    target, non_target, count = 0.0, 0.0, 0
    for s_row, t_row, y in zip(student, teacher, labels.tolist()):
        if y < 0:
            continue
        p, q = torch.softmax(s_row, 0), torch.softmax(t_row, 0)
        target = target - q[y] * torch.log(p[y])
        p_l, q_l = torch.softmax(s_row / temperature, 0), torch.softmax(t_row / temperature, 0)
        classes = range(len(s_row)) if keep_target else [c for c in range(len(s_row)) if c != y]
        p_mass, q_mass = sum(p_l[c] for c in classes), sum(q_l[c] for c in classes)
        for c in classes:
            non_target = non_target - temperature**2 * (q_l[c] / q_mass) * torch.log(p_l[c] / p_mass)
        count += 1
    zero = (student * 0).sum()
    return target / max(count, 1) + zero, non_target / max(count, 1) + zero


def official_loss(student, teacher, labels, temperature, gamma, keep_target=False):
    """yzd-v/cls_KD's NKDLoss.forward written out (all rows labelled): keep_target=True is its mask before
    commit 9466b3f (scatter_ of 1: all ones), False the fixed one (scatter_ of 0)."""
    label = labels.view(-1, 1)
    n = student.shape[0]
    s_t = torch.gather(F.log_softmax(student, 1), 1, label)
    t_t = torch.gather(F.softmax(teacher, 1), 1, label).detach()
    loss_t = -(t_t * s_t).mean()
    mask = torch.ones_like(student).scatter_(1, label, 1 if keep_target else 0).bool()
    s_nt, t_nt = student[mask].reshape(n, -1), teacher[mask].reshape(n, -1)
    loss_non = (F.softmax(t_nt / temperature, 1) * F.log_softmax(s_nt / temperature, 1)).sum(1).mean()
    return loss_t - gamma * temperature**2 * loss_non


def terms_and_grads(terms_fn, student, teacher, labels, temperature, keep_target=False):
    student = student.clone().requires_grad_(True)
    target, non_target = terms_fn(student, teacher, labels, temperature, keep_target)
    return [target, non_target, *[torch.autograd.grad(t, student, retain_graph=True)[0] for t in (target, non_target)]]


def assert_same(actual, expected):
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


def logits(rows, classes, seed, scale=2.0):
    return scale * torch.randn(rows, classes, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("keep_target", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("labels", [[0, 2, 1, 3, 2], [-1, 2, -1, 0, 3], [3, -1, -1, -1, -1]])
def test_terms_and_gradients_match_reference(labels, temperature, keep_target):
    student, teacher, labels = logits(5, 4, 0), logits(5, 4, 1), torch.tensor(labels)
    assert_same(terms_and_grads(nkd_terms, student, teacher, labels, temperature, keep_target),
                terms_and_grads(reference_terms, student, teacher, labels, temperature, keep_target))


@pytest.mark.parametrize("keep_target", [False, True])
@pytest.mark.parametrize("temperature,gamma", [(1.0, 1.5), (3.0, 3.5)])
def test_nkd_loss_matches_the_official_code_before_and_after_its_mask_fix(temperature, gamma, keep_target):
    student, teacher, labels = logits(6, 7, 2), logits(6, 7, 3), torch.tensor([0, 6, 3, 3, 1, 5])
    values = []
    for loss_fn in (nkd_loss, official_loss):
        s = student.clone().requires_grad_(True)
        loss = loss_fn(s, teacher, labels, temperature, gamma, keep_target)
        values += [loss, torch.autograd.grad(loss, s)[0]]
    assert_same(values[:2], values[2:])


def test_the_mask_fix_changes_the_loss():
    student, teacher, labels = logits(4, 5, 4), logits(4, 5, 5), torch.tensor([0, 1, 2, 3])
    assert not torch.allclose(nkd_loss(student, teacher, labels), nkd_loss(student, teacher, labels,
                                                                            keep_target_in_non_target=True))


def test_defaults_are_temperature_1_and_gamma_1_5():
    student, teacher, labels = logits(4, 5, 6), logits(4, 5, 7), torch.tensor([4, 1, 0, 2])
    target, non_target = nkd_terms(student, teacher, labels, 1.0)
    torch.testing.assert_close(nkd_loss(student, teacher, labels), target + 1.5 * non_target)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_a_certain_teacher_weighs_the_target_term_as_cross_entropy(temperature):
    # The teacher's target probability is 1: the target term is the student's cross-entropy; the
    # non-target distribution (uniform here) stays defined after normalisation.
    student, labels = logits(3, 5, 8), torch.tensor([4, 0, 2])
    teacher = torch.zeros(3, 5, dtype=torch.float64).scatter(1, labels[:, None], 60.0 * temperature)
    actual = terms_and_grads(nkd_terms, student, teacher, labels, temperature)
    assert_same(actual, terms_and_grads(reference_terms, student, teacher, labels, temperature))
    torch.testing.assert_close(actual[0], F.cross_entropy(student, labels), rtol=1e-10, atol=1e-12)
    log_p = F.log_softmax(student.gather(1, torch.tensor([[0, 1, 2, 3], [1, 2, 3, 4], [0, 1, 3, 4]])) / temperature, 1)
    torch.testing.assert_close(actual[1], -temperature**2 * log_p.mean(1).mean(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_equal_logits_leave_the_entropies_and_no_non_target_gradient(temperature):
    # A cross-entropy form, not a KL: equal logits give the teacher's entropies, and the non-target term
    # is at its minimum (zero gradient); the target term still pushes the target up.
    student, labels = logits(4, 5, 9), torch.tensor([0, 1, 2, 3])
    actual = terms_and_grads(nkd_terms, student, student.clone(), labels, temperature)
    assert_same(actual, terms_and_grads(reference_terms, student, student.clone(), labels, temperature))
    assert actual[3].abs().max() < 1e-14 and actual[2].abs().max() > 1e-3


def test_one_class_gives_zero_and_finite_gradients():
    for keep_target in (False, True):
        values = terms_and_grads(nkd_terms, logits(3, 1, 10), logits(3, 1, 11), torch.zeros(3, dtype=torch.long), 1.0,
                                 keep_target)
        assert all(torch.isfinite(v).all() and v.abs().max() < 1e-12 for v in values)


def test_unlabelled_batch_gives_zero_with_a_graph_and_the_teacher_gets_no_gradient():
    student, teacher = logits(3, 4, 12).requires_grad_(True), logits(3, 4, 13).requires_grad_(True)
    loss = nkd_loss(student, teacher, torch.full((3,), -1))
    grads = torch.autograd.grad(loss, (student, teacher), allow_unused=True)
    assert loss.item() == 0.0 and torch.count_nonzero(grads[0]) == 0 and grads[1] is None


def test_a_teacher_with_zero_probabilities_stays_finite():
    student = logits(2, 4, 14)
    teacher = torch.tensor([[0.0, -math.inf, 1.0, 2.0], [3.0, 0.0, -math.inf, -math.inf]], dtype=torch.float64)
    for value in terms_and_grads(nkd_terms, student, teacher, torch.tensor([0, 1]), 1.0):
        assert torch.isfinite(value).all()
