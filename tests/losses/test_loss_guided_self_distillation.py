"""guided_self_distillation_loss (Borup and Andersen 2021) against a plain reference: values and gradients in
float64 for both objectives, the one-mixed-target identities, the edge cases (a certain teacher, equal logits,
one class, alpha 1 and 0, unlabelled rows) and a two-rank gloo check."""

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ssl_lightning.losses.guided_self_distillation import (
    guided_self_distillation_loss,
    guided_self_distillation_terms,
)

from helpers.gloo import assert_global_batch_value_and_gradients, run_on_two_ranks

OBJECTIVES = ("mse", "cross_entropy")


def softmax(row):
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


def reference_terms(student, teacher, labels, objective):
    """Row by row, class by class, in Python floats: the mean label term over labelled rows and the mean
    teacher term over all rows (squared error of probabilities averaged over classes, or cross-entropy)."""
    label_total, labelled, teacher_total = 0.0, 0, 0.0
    for s_row, t_row, label in zip(student.tolist(), teacher.tolist(), labels.tolist()):
        p, q, classes = softmax(s_row), softmax(t_row), len(s_row)
        one_hot = [1.0 if c == label else 0.0 for c in range(classes)]
        if objective == "mse":
            label_row = sum((p[c] - one_hot[c]) ** 2 for c in range(classes)) / classes
            teacher_row = sum((p[c] - q[c]) ** 2 for c in range(classes)) / classes
        else:
            label_row = -math.log(p[label]) if label >= 0 else 0.0
            teacher_row = -sum(q[c] * math.log(p[c]) for c in range(classes))
        if label >= 0:
            label_total, labelled = label_total + label_row, labelled + 1
        teacher_total += teacher_row
    return label_total / max(labelled, 1), teacher_total / len(labels)


def reference_loss(student, teacher, labels, alpha, objective):
    label_term, teacher_term = reference_terms(student, teacher, labels, objective)
    return alpha * label_term + (1 - alpha) * teacher_term


def numerical_gradient(fn, student, eps=1e-6):
    """Central differences of a Python-float function of the student's logits."""
    grad = torch.zeros_like(student)
    for index in range(student.numel()):
        plus, minus = student.clone(), student.clone()
        plus.view(-1)[index] += eps
        minus.view(-1)[index] -= eps
        grad.view(-1)[index] = (fn(plus) - fn(minus)) / (2 * eps)
    return grad


def value_and_grad(student, teacher, labels, alpha, objective):
    student = student.clone().requires_grad_(True)
    loss = guided_self_distillation_loss(student, teacher, labels, alpha, objective)
    return loss, torch.autograd.grad(loss, student)[0]


def logits(rows, classes, seed, scale=2.0):
    return scale * torch.randn(rows, classes, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def labels_for(rows, classes, seed, unlabelled=()):
    labels = torch.randint(0, classes, (rows,), generator=torch.Generator().manual_seed(seed))
    labels[list(unlabelled)] = -1
    return labels


def assert_matches_reference(student, teacher, labels, alpha, objective):
    loss, grad = value_and_grad(student, teacher, labels, alpha, objective)
    expected = reference_loss(student, teacher, labels, alpha, objective)
    expected_grad = numerical_gradient(lambda s: reference_loss(s, teacher, labels, alpha, objective), student)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(expected, rel=1e-12, abs=1e-14)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-6, atol=1e-9)
    return loss, grad


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("alpha", [0.6, 0.25])
@pytest.mark.parametrize("rows,classes,unlabelled", [(5, 4, ()), (1, 10, ()), (7, 3, (1, 4))])
def test_value_and_gradient_match_reference(rows, classes, unlabelled, alpha, objective):
    labels = labels_for(rows, classes, 2, unlabelled)
    assert_matches_reference(logits(rows, classes, 0), logits(rows, classes, 1), labels, alpha, objective)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_terms_match_reference_and_alpha_multiplies_the_label_term(objective):
    student, teacher, labels = logits(6, 5, 3), logits(6, 5, 4), labels_for(6, 5, 5, (2,))
    terms = guided_self_distillation_terms(student, teacher, labels, objective)
    expected = reference_terms(student, teacher, labels, objective)
    assert [terms["labels"].item(), terms["teacher"].item()] == pytest.approx(expected, rel=1e-12)
    assert terms["labels"].item() != pytest.approx(terms["teacher"].item(), rel=1e-3)  # alpha's side is visible
    loss = guided_self_distillation_loss(student, teacher, labels, 0.9, objective)
    assert loss.item() == pytest.approx(0.9 * expected[0] + 0.1 * expected[1], rel=1e-12)


def test_cross_entropy_form_equals_soft_target_cross_entropy_with_the_mixed_target():
    # CE is linear in its target: alpha CE(y) + (1 - alpha) CE(q) = CE(alpha y + (1 - alpha) q), value and gradient.
    student, teacher, labels, alpha = logits(5, 4, 6), logits(5, 4, 7), labels_for(5, 4, 8), 0.6
    loss, grad = value_and_grad(student, teacher, labels, alpha, "cross_entropy")
    mixed = alpha * F.one_hot(labels, 4).double() + (1 - alpha) * teacher.softmax(1)
    leaf = student.clone().requires_grad_(True)
    soft = -(mixed * leaf.log_softmax(1)).sum(1).mean()
    torch.testing.assert_close(loss, soft, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, torch.autograd.grad(soft, leaf)[0], rtol=1e-10, atol=1e-14)


def test_mse_form_has_the_mixed_targets_gradient_and_its_value_plus_a_student_free_constant():
    # alpha |p - y|^2 + (1 - alpha) |p - q|^2 = |p - m|^2 + alpha (1 - alpha) |y - q|^2, m the mixed target.
    student, teacher, labels, alpha = logits(5, 4, 9), logits(5, 4, 10), labels_for(5, 4, 11), 0.6
    loss, grad = value_and_grad(student, teacher, labels, alpha, "mse")
    y, q = F.one_hot(labels, 4).double(), teacher.softmax(1)
    mixed = alpha * y + (1 - alpha) * q
    leaf = student.clone().requires_grad_(True)
    against_mixed = (leaf.softmax(1) - mixed).square().mean()
    constant = alpha * (1 - alpha) * (y - q).square().mean()
    torch.testing.assert_close(loss, against_mixed + constant, rtol=1e-12, atol=0)
    assert constant > 1e-3  # the values do differ
    torch.testing.assert_close(grad, torch.autograd.grad(against_mixed, leaf)[0], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_alpha_one_is_plain_training_on_the_labels_exactly(objective):
    student, teacher, labels = logits(6, 5, 12), logits(6, 5, 13), labels_for(6, 5, 14, (0, 3))
    loss, grad = value_and_grad(student, teacher, labels, 1.0, objective)
    leaf = student.clone().requires_grad_(True)
    labelled = labels >= 0
    if objective == "cross_entropy":
        plain = F.cross_entropy(leaf[labelled], labels[labelled])
    else:
        plain = F.mse_loss(leaf[labelled].softmax(1), F.one_hot(labels[labelled], 5).double())
    torch.testing.assert_close(loss, plain, rtol=1e-14, atol=0)
    torch.testing.assert_close(grad, torch.autograd.grad(plain, leaf)[0], rtol=1e-12, atol=1e-15)
    # and without a teacher, the label term alone is the same number (round 0)
    alone = guided_self_distillation_terms(student, None, labels, objective)
    assert list(alone) == ["labels"] and alone["labels"].item() == pytest.approx(plain.item(), rel=1e-14)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_alpha_zero_is_pure_distillation_and_needs_no_labels(objective):
    student, teacher = logits(4, 3, 15), logits(4, 3, 16)
    unlabelled = torch.full((4,), -1)
    loss, grad = value_and_grad(student, teacher, unlabelled, 0.0, objective)
    leaf = student.clone().requires_grad_(True)
    q = teacher.softmax(1)
    if objective == "cross_entropy":
        pure = -(q * leaf.log_softmax(1)).sum(1).mean()
    else:
        pure = F.mse_loss(leaf.softmax(1), q)
    torch.testing.assert_close(loss, pure, rtol=1e-14, atol=0)
    torch.testing.assert_close(grad, torch.autograd.grad(pure, leaf)[0], rtol=1e-12, atol=1e-15)
    # the labels do not matter at alpha 0
    assert guided_self_distillation_loss(student, teacher, labels_for(4, 3, 17), 0.0, objective).item() == loss.item()


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_a_certain_teacher_that_agrees_with_the_labels_gives_the_label_loss_for_any_alpha(objective):
    student, labels = logits(4, 5, 18), torch.tensor([0, 3, 1, 4])
    certain = torch.full((4, 5), -math.inf, dtype=torch.float64).scatter(1, labels[:, None], 0.0)
    for alpha in (0.0, 0.6):
        loss, grad = assert_matches_reference(student, certain, labels, alpha, objective)
        torch.testing.assert_close(loss, guided_self_distillation_loss(student, certain, labels, 1.0, objective))
        assert torch.isfinite(grad).all()


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_equal_logits_give_the_uniform_distributions_loss_and_a_zero_teacher_gradient(objective):
    classes = 5
    student = torch.zeros(3, classes, dtype=torch.float64)
    labels = torch.tensor([0, 2, 4])
    terms = guided_self_distillation_terms(student, torch.zeros_like(student), labels, objective)
    if objective == "cross_entropy":
        assert terms["labels"].item() == pytest.approx(math.log(classes), rel=1e-14)
        assert terms["teacher"].item() == pytest.approx(math.log(classes), rel=1e-14)
    else:
        assert terms["labels"].item() == pytest.approx(((1 / classes - 1) ** 2 + (classes - 1) / classes**2) / classes)
        assert terms["teacher"].item() == 0.0
    leaf = student.clone().requires_grad_(True)
    teacher_grad = torch.autograd.grad(guided_self_distillation_loss(leaf, student, labels, 0.0, objective), leaf)[0]
    assert teacher_grad.abs().max() < 1e-15  # the student already predicts the teacher's distribution


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_one_class_gives_zero_loss_and_zero_gradient(objective):
    loss, grad = value_and_grad(logits(3, 1, 19), logits(3, 1, 20), torch.zeros(3, dtype=torch.long), 0.6, objective)
    assert loss.item() == 0.0 and torch.count_nonzero(grad) == 0


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_unlabelled_rows_leave_the_label_term_but_keep_the_teacher_term(objective):
    student, teacher = logits(5, 4, 21), logits(5, 4, 22)
    labels = torch.tensor([1, -1, 0, -1, 3])
    terms = guided_self_distillation_terms(student, teacher, labels, objective)
    labelled = guided_self_distillation_terms(student[[0, 2, 4]], teacher[[0, 2, 4]], labels[[0, 2, 4]], objective)
    assert terms["labels"].item() == pytest.approx(labelled["labels"].item(), rel=1e-14)
    assert terms["teacher"].item() != pytest.approx(labelled["teacher"].item(), rel=1e-6)  # all five rows count
    leaf = student.clone().requires_grad_(True)
    none = guided_self_distillation_terms(leaf, teacher, torch.full((5,), -1), objective)
    assert none["labels"].item() == 0.0 and none["labels"].grad_fn is not None  # 0 with a graph: backward works
    assert torch.count_nonzero(torch.autograd.grad(none["labels"], leaf)[0]) == 0
    assert none["teacher"].item() == pytest.approx(terms["teacher"].item(), rel=1e-14)


def test_the_teacher_gets_no_gradient():
    student, teacher = logits(3, 4, 23).requires_grad_(True), logits(3, 4, 24).requires_grad_(True)
    guided_self_distillation_loss(student, teacher, torch.tensor([0, 1, 2])).backward()
    assert teacher.grad is None and student.grad is not None


def test_half_precision_inputs_give_a_float32_loss():
    student, teacher = logits(4, 6, 25).half(), logits(4, 6, 26).half()
    loss = guided_self_distillation_loss(student, teacher, torch.tensor([0, 1, 2, 5]))
    expected = guided_self_distillation_loss(student.float(), teacher.float(), torch.tensor([0, 1, 2, 5]))
    assert loss.dtype == torch.float32 and loss.item() == expected.item()


@pytest.mark.parametrize("bad, match", [
    (dict(alpha=1.5), r"alpha .* \[0, 1\], got 1.5"),
    (dict(alpha=-0.1), r"alpha .* \[0, 1\], got -0.1"),
    (dict(objective="kl"), "objective must be one of"),
    (dict(teacher_logits=torch.zeros(4, 3)), r"same 2-D shape .* \(4, 5\) and \(4, 3\)"),
    (dict(labels=torch.zeros(4)), "integer tensor of shape"),
    (dict(labels=torch.zeros(3, dtype=torch.long)), "integer tensor of shape"),
    (dict(student_logits=torch.zeros(4)), r"shape \[N, C\]"),
    (dict(teacher_logits=None), "needs teacher_logits"),
])
def test_bad_input_is_named(bad, match):
    args = dict(student_logits=torch.zeros(4, 5), teacher_logits=torch.zeros(4, 5),
                labels=torch.zeros(4, dtype=torch.long), alpha=0.6, objective="mse")
    with pytest.raises(ValueError, match=match):
        guided_self_distillation_loss(**{**args, **bad})


# ----------------------------------------------------------------- two ranks
SHARD_SIZES = [3, 5]
CLASSES = 6


def both_objectives_on_one_rank(students, teachers, labels) -> dict:
    rank = dist.get_rank()
    results = {}
    for objective in OBJECTIVES:
        student = students[rank].clone().requires_grad_(True)
        loss = guided_self_distillation_loss(student, teachers[rank], labels[rank], 0.6, objective)
        results[objective] = {"loss": loss.detach(), "grad": torch.autograd.grad(loss, student)[0]}
    return results


@pytest.mark.ddp
@pytest.mark.timeout(120)
def test_two_ranks_give_the_global_batch_value_and_gradients(tmp_path):
    generator = torch.Generator().manual_seed(0)
    students = [2 * torch.randn(n, CLASSES, generator=generator, dtype=torch.float64) for n in SHARD_SIZES]
    teachers = [2 * torch.randn(n, CLASSES, generator=generator, dtype=torch.float64) for n in SHARD_SIZES]
    # rank 0 has no labelled row: a per-rank mean would weigh rank 1's rows wrongly
    labels = [torch.full((SHARD_SIZES[0],), -1), torch.tensor([2, -1, 0, 5, 1])]
    results = run_on_two_ranks(both_objectives_on_one_rank, tmp_path, students, teachers, labels)
    for objective in OBJECTIVES:
        student = torch.cat(students).requires_grad_(True)
        loss = guided_self_distillation_loss(student, torch.cat(teachers), torch.cat(labels), 0.6, objective)
        grad = torch.autograd.grad(loss, student)[0]
        assert loss.abs() > 1e-3
        assert_global_batch_value_and_gradients([r[objective] for r in results], loss.detach(), grad, SHARD_SIZES)
