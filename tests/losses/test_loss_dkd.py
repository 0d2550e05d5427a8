"""DKD's terms (Zhao et al. 2022) against a plain reference and against mdistiller's formula written
out: values and gradients in float64, unlabelled rows masked, and the edge cases (a certain teacher,
equal logits, one class, T = 1 against T = 4)."""

import pytest
import torch
import torch.nn.functional as F

from ssl_lightning.losses.dkd import decoupled_kd_terms, dkd_loss
from ssl_lightning.losses.kd import kd_loss


def kl(q, p):
    """sum_k q_k log(q_k / p_k) over the entries, 0 log 0 = 0."""
    return sum(q[k] * (torch.log(q[k]) - torch.log(p[k])) for k in range(len(q)) if q[k] > 0)


def reference_terms(student, teacher, labels, temperature):
    """Row by row over the labelled rows: the binary (target, rest) KL and the KL of the distributions
    over the non-target classes, both times T^2, averaged over the labelled rows."""
    tckd, nckd, count = 0.0, 0.0, 0
    for s_row, t_row, y in zip(student, teacher, labels.tolist()):
        if y < 0:
            continue
        p = torch.softmax(s_row / temperature, 0)
        q = torch.softmax(t_row / temperature, 0)
        others = [c for c in range(len(s_row)) if c != y]
        p_rest, q_rest = sum(p[c] for c in others) if others else p[y] * 0, sum(q[c] for c in others) if others else q[y] * 0
        tckd = tckd + kl(torch.stack([q[y], q_rest]), torch.stack([p[y], p_rest]))
        if others:
            nckd = nckd + kl(torch.stack([q[c] / q_rest for c in others]), torch.stack([p[c] / p_rest for c in others]))
        count += 1
    scale = temperature**2 / max(count, 1)
    zero = (student * 0).sum()
    return tckd * scale + zero, nckd * scale + zero


def mdistiller_terms(student, teacher, labels, temperature):
    """mdistiller's dkd_loss (mdistiller/distillers/DKD.py) written out for all-labelled batches: the
    gt / other masks, the binary probabilities by masked sums, the -1000 offset for NCKD."""
    gt = torch.zeros_like(student).scatter_(1, labels[:, None], 1).bool()
    p, q = F.softmax(student / temperature, 1), F.softmax(teacher / temperature, 1)

    def binary(x):
        return torch.cat([(x * gt).sum(1, keepdim=True), (x * ~gt).sum(1, keepdim=True)], 1)

    n = labels.shape[0]
    tckd = F.kl_div(torch.log(binary(p)), binary(q), reduction="sum") * temperature**2 / n
    nckd = F.kl_div(F.log_softmax(student / temperature - 1000.0 * gt, 1),
                    F.softmax(teacher / temperature - 1000.0 * gt, 1), reduction="sum") * temperature**2 / n
    return tckd, nckd


def terms_and_grads(terms_fn, student, teacher, labels, temperature):
    student = student.clone().requires_grad_(True)
    tckd, nckd = terms_fn(student, teacher, labels, temperature)
    return [tckd, nckd, *[torch.autograd.grad(term, student, retain_graph=True)[0] for term in (tckd, nckd)]]


def assert_same(actual, expected, rtol=1e-10, atol=1e-12):
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol)


def logits(rows, classes, seed, scale=2.0):
    return scale * torch.randn(rows, classes, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("labels", [[0, 2, 1, 3, 2], [-1, 2, -1, 0, 3], [3, -1, -1, -1, -1]])
def test_terms_and_gradients_match_reference(labels, temperature):
    student, teacher, labels = logits(5, 4, 0), logits(5, 4, 1), torch.tensor(labels)
    assert_same(terms_and_grads(decoupled_kd_terms, student, teacher, labels, temperature),
                terms_and_grads(reference_terms, student, teacher, labels, temperature))


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_terms_and_gradients_match_mdistillers_formula(temperature):
    student, teacher, labels = logits(6, 10, 2), logits(6, 10, 3), torch.tensor([0, 9, 4, 4, 1, 7])
    assert_same(terms_and_grads(decoupled_kd_terms, student, teacher, labels, temperature),
                terms_and_grads(mdistiller_terms, student, teacher, labels, temperature))


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_is_tckd_plus_the_teachers_non_target_mass_times_nckd(temperature):
    # The paper's eq. (1) for one image: KD = TCKD + (1 - q_y) NCKD.
    student, teacher, label = logits(1, 6, 4), logits(1, 6, 5), torch.tensor([2])
    tckd, nckd = decoupled_kd_terms(student, teacher, label, temperature)
    q_rest = 1 - torch.softmax(teacher / temperature, 1)[0, 2]
    torch.testing.assert_close(kd_loss(student, teacher, temperature), tckd + q_rest * nckd, rtol=1e-10, atol=1e-12)


def test_dkd_loss_weighs_tckd_by_alpha_and_nckd_by_beta():
    student, teacher, labels = logits(4, 5, 6), logits(4, 5, 7), torch.tensor([1, 0, 4, 2])
    tckd, nckd = decoupled_kd_terms(student, teacher, labels, 4.0)
    torch.testing.assert_close(dkd_loss(student, teacher, labels), 1.0 * tckd + 8.0 * nckd)  # defaults alpha 1, beta 8
    torch.testing.assert_close(dkd_loss(student, teacher, labels, alpha=0.5, beta=2.0, temperature=4.0),
                               0.5 * tckd + 2.0 * nckd)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_a_certain_teacher_leaves_the_students_binary_cross_entropy_at_t(temperature):
    # The teacher puts (almost) all its mass on the label: TCKD -> -T^2 log b_y, NCKD still defined.
    student, labels = logits(3, 5, 8), torch.tensor([4, 0, 2])
    teacher = torch.zeros(3, 5, dtype=torch.float64).scatter(1, labels[:, None], 60.0 * temperature)
    actual = terms_and_grads(decoupled_kd_terms, student, teacher, labels, temperature)
    assert_same(actual, terms_and_grads(reference_terms, student, teacher, labels, temperature))
    p_y = torch.softmax(student / temperature, 1).gather(1, labels[:, None])
    torch.testing.assert_close(actual[0], -temperature**2 * torch.log(p_y).mean(), rtol=1e-10, atol=1e-12)


def test_equal_logits_give_zero_terms_and_zero_gradients():
    student, labels = logits(5, 4, 9), torch.tensor([0, 1, 2, 3, -1])
    for value in terms_and_grads(decoupled_kd_terms, student, student.clone(), labels, 4.0):
        assert value.abs().max() < 1e-13


def test_one_class_gives_zero_and_finite_gradients():
    # No non-target class: mdistiller's log(0) gives NaN here.
    for value in terms_and_grads(decoupled_kd_terms, logits(3, 1, 10), logits(3, 1, 11), torch.zeros(3, dtype=torch.long), 4.0):
        assert torch.isfinite(value).all() and value.abs().max() < 1e-12


def test_a_saturated_student_stays_finite():
    # The student's non-target probability underflows in float32 (mdistiller: log(0) = -inf, an infinite loss).
    student = torch.tensor([[400.0, 0.0, 0.0]], requires_grad=True)
    tckd, nckd = decoupled_kd_terms(student, torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([0]), 1.0)
    (tckd + nckd).backward()
    assert torch.isfinite(tckd) and torch.isfinite(nckd) and torch.isfinite(student.grad).all()


def test_unlabelled_batch_gives_zero_with_a_graph_and_the_teacher_gets_no_gradient():
    student, teacher = logits(3, 4, 12).requires_grad_(True), logits(3, 4, 13).requires_grad_(True)
    tckd, nckd = decoupled_kd_terms(student, teacher, torch.full((3,), -1), 4.0)
    grads = torch.autograd.grad(tckd + nckd, (student, teacher), allow_unused=True)
    assert tckd.item() == 0.0 and nckd.item() == 0.0
    assert torch.count_nonzero(grads[0]) == 0 and grads[1] is None


def test_bad_labels_are_named():
    with pytest.raises(ValueError, match=r"dkd expects labels as an integer tensor of shape \[N\] = \(2,\)"):
        decoupled_kd_terms(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))
