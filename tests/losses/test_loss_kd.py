"""kd_loss (Hinton et al. 2015, mdistiller's form) against a plain reference: values and gradients in
float64, and the edge cases (a certain teacher, equal logits, one class, T = 1 against T = 4)."""

import math

import pytest
import torch

from ssl_lightning.losses.kd import kd_loss


def reference_kd(student, teacher, temperature):
    """Row by row, class by class: T^2 * mean_i sum_c q_ic (log q_ic - log p_ic), with 0 log 0 = 0."""
    total = 0.0
    for s_row, t_row in zip(student, teacher):
        p = torch.exp(s_row / temperature) / torch.exp(s_row / temperature).sum()
        q = torch.exp(t_row / temperature) / torch.exp(t_row / temperature).sum()
        for c in range(len(s_row)):
            if q[c] > 0:
                total = total + q[c] * (torch.log(q[c]) - torch.log(p[c]))
    return temperature**2 * total / len(student)


def value_and_grad(loss_fn, student, teacher, temperature):
    student = student.clone().requires_grad_(True)
    loss = loss_fn(student, teacher, temperature)
    return loss, torch.autograd.grad(loss, student)[0]


def logits(rows, classes, seed, scale=2.0):
    return scale * torch.randn(rows, classes, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def assert_matches_reference(student, teacher, temperature):
    actual = value_and_grad(kd_loss, student, teacher, temperature)
    expected = value_and_grad(reference_kd, student, teacher, temperature)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)
    return actual


@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("rows,classes", [(5, 4), (1, 10), (7, 2)])
def test_value_and_gradient_match_reference(rows, classes, temperature):
    assert_matches_reference(logits(rows, classes, 0), logits(rows, classes, 1), temperature)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_a_certain_teacher_gives_t_squared_times_the_students_cross_entropy_at_t(temperature):
    # A one-hot teacher (logits -inf off the target): only the target term is left, 0 log 0 = 0.
    student = logits(4, 5, 2)
    labels = torch.tensor([0, 3, 1, 4])
    teacher = torch.full((4, 5), -math.inf, dtype=torch.float64).scatter(1, labels[:, None], 0.0)
    loss, grad = assert_matches_reference(student, teacher, temperature)
    cross_entropy = torch.nn.functional.cross_entropy(student / temperature, labels)
    torch.testing.assert_close(loss, temperature**2 * cross_entropy, rtol=1e-12, atol=1e-12)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_equal_logits_give_zero_loss_and_zero_gradient(temperature):
    student = logits(6, 5, 3)
    loss, grad = value_and_grad(kd_loss, student, student.clone(), temperature)
    assert abs(loss.item()) < 1e-14 and grad.abs().max() < 1e-14


def test_one_class_gives_zero_loss_and_zero_gradient():
    loss, grad = value_and_grad(kd_loss, logits(3, 1, 4), logits(3, 1, 5), 4.0)
    assert loss.item() == 0.0 and torch.count_nonzero(grad) == 0


def test_temperature_divides_the_logits_and_t_squared_restores_the_scale():
    # T = 4 is T^2 times the T = 1 loss on logits divided by 4: the only place T enters.
    student, teacher = logits(5, 6, 6), logits(5, 6, 7)
    at_4 = kd_loss(student, teacher, 4.0)
    torch.testing.assert_close(at_4, 16 * kd_loss(student / 4, teacher / 4, 1.0), rtol=1e-12, atol=0)
    assert not torch.allclose(at_4, kd_loss(student, teacher, 1.0))  # and T matters


def test_the_teacher_gets_no_gradient():
    teacher = logits(3, 4, 8).requires_grad_(True)
    student = logits(3, 4, 9).requires_grad_(True)
    grad_student, grad_teacher = torch.autograd.grad(kd_loss(student, teacher), (student, teacher), allow_unused=True)
    assert grad_teacher is None and grad_student.abs().sum() > 0


def test_half_precision_inputs_are_computed_in_float32():
    student, teacher = logits(4, 3, 10).bfloat16(), logits(4, 3, 11).bfloat16()
    loss = kd_loss(student, teacher)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, kd_loss(student.float(), teacher.float()))


def test_mismatched_class_counts_and_bad_temperature_are_named():
    with pytest.raises(ValueError, match=r"kd_loss expects student_logits and teacher_logits of the same 2-D shape .*"
                                         r"got \(2, 10\) and \(2, 100\)"):
        kd_loss(torch.zeros(2, 10), torch.zeros(2, 100))
    with pytest.raises(ValueError, match="temperature > 0, got 0"):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 3), temperature=0)
