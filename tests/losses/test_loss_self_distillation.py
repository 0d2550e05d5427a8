"""The distillation term of self-distillation for further pre-training against the paper's formula, written
out image by image: 1/n sum_i ||h_s_i - h_t_i||^2, the teacher a target (no gradient)."""

import pytest
import torch

from ssl_lightning.losses.self_distillation import self_distillation_loss


def reference_loss(student, teacher):
    """The official SelfPreTrainer: MSELoss(reduction="sum") of the two [N, D] matrices, divided by N."""
    total = 0.0
    for i in range(student.shape[0]):
        for d in range(student.shape[1]):
            total = total + (student[i, d] - teacher[i, d]) ** 2
    return total / student.shape[0]


def value_and_student_grad(loss_fn, student, teacher):
    student = student.clone().requires_grad_(True)
    loss = loss_fn(student, teacher)
    (grad,) = torch.autograd.grad(loss, student)
    return loss, grad


@pytest.mark.parametrize("batch, dim", [(1, 3), (2, 5), (7, 4), (16, 32)])
def test_value_and_gradient_match_the_reference(batch, dim):
    generator = torch.Generator().manual_seed(batch * 100 + dim)
    student = torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    teacher = torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    loss, grad = value_and_student_grad(self_distillation_loss, student, teacher)
    expected_loss, expected_grad = value_and_student_grad(reference_loss, student, teacher)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, 2 * (student - teacher) / batch, rtol=1e-12, atol=1e-14)  # the closed form


def test_the_teacher_is_a_target_and_gets_no_gradient():
    student = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    self_distillation_loss(student, teacher).backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0


def test_identical_representations_give_zero_loss_and_gradient():
    student = torch.randn(6, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    loss, grad = value_and_student_grad(self_distillation_loss, student, student.clone())
    assert loss.item() == 0.0 and not grad.any()


def test_a_shift_by_c_costs_c_squared_times_the_width():
    student = torch.randn(3, 8, dtype=torch.float64)
    torch.testing.assert_close(self_distillation_loss(student + 0.5, student).item(), 0.25 * 8, rtol=1e-14, atol=0)


def test_an_empty_batch_gives_zero():
    loss = self_distillation_loss(torch.zeros(0, 4, requires_grad=True), torch.zeros(0, 4))
    assert loss.item() == 0.0 and loss.requires_grad


def test_bfloat16_inputs_give_a_float32_loss_close_to_float64():
    student, teacher = torch.randn(2, 32, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    low = self_distillation_loss(student.bfloat16(), teacher.bfloat16())
    assert low.dtype == torch.float32
    exact = self_distillation_loss(student.bfloat16().double(), teacher.bfloat16().double())
    torch.testing.assert_close(low.double(), exact, rtol=1e-6, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast does not lower the loss's own arithmetic
        assert self_distillation_loss(student.float(), teacher.float()).dtype == torch.float32


@pytest.mark.parametrize(
    "shape1, shape2, match",
    [
        ((4, 3), (5, 3), r"student and teacher of the same 2-D shape.*\(4, 3\) and \(5, 3\)"),
        ((4, 3), (4, 6), r"\(4, 3\) and \(4, 6\)"),
        ((4, 3, 2), (4, 3, 2), r"same 2-D shape"),
    ],
)
def test_rejects_representations_that_do_not_pair_up(shape1, shape2, match):
    with pytest.raises(ValueError, match=match):
        self_distillation_loss(torch.randn(shape1), torch.randn(shape2))
