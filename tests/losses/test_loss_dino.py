"""DINO's loss and teacher targets against the official training loop written out plainly (float64):
the cross-entropy over the pairs (teacher crop i, student crop j), i != j; the centred, sharpened
targets; the centre's update; the Sinkhorn-Knopp option (DINOv2). Two ranks: test_dino_two_ranks.py."""

import math

import numpy as np
import pytest
import torch

from ssl_lightning.components.multicrop import cross_view_pairs
from ssl_lightning.losses.dino import dino_centre_update, dino_loss, dino_teacher_targets
from ssl_lightning.losses.sinkhorn import sinkhorn_knopp


def reference_dino_loss(student, targets, student_temp):
    """The official ``DINOLoss.forward``: for each teacher crop iq and student crop v != iq, the batch
    mean of -sum_k q log softmax(s / T_s); the sum over those pairs divided by their number."""
    num_student, num_images, _ = student.shape
    total, pairs = 0.0, 0
    for iq in range(targets.shape[0]):
        for v in range(num_student):
            if v == iq:
                continue
            per_image = 0.0
            for n in range(num_images):
                logits = student[v, n] / student_temp
                log_p = logits - torch.log(torch.exp(logits).sum())
                per_image = per_image - (targets[iq, n] * log_p).sum()
            total = total + per_image / num_images
            pairs += 1
    return total / pairs


def random_logits(num_crops, num_images, num_outputs, seed=0, scale=3.0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num_crops, num_images, num_outputs, generator=generator, dtype=torch.float64) * scale


def random_targets(num_crops, num_images, num_outputs, seed=1):
    probabilities = torch.rand(num_crops, num_images, num_outputs, generator=torch.Generator().manual_seed(seed),
                               dtype=torch.float64)
    return probabilities / probabilities.sum(dim=-1, keepdim=True)


def value_and_grad(loss_fn, student, targets, student_temp):
    student = student.clone().requires_grad_(True)
    loss = loss_fn(student, targets, student_temp)
    return loss, torch.autograd.grad(loss, student)[0]


def assert_matches_reference(student, targets, student_temp=0.1):
    loss, grad = value_and_grad(dino_loss, student, targets, student_temp)
    expected, expected_grad = value_and_grad(reference_dino_loss, student, targets, student_temp)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- the loss


@pytest.mark.parametrize("num_teacher, num_student, num_images", [
    (2, 6, 5),   # 2 global + 4 local crops
    (2, 2, 4),   # all views global: the two pairs (0, 1) and (1, 0)
    (4, 4, 3),   # all views global, four of them
    (2, 10, 1),  # one image, 8 local crops
    (1, 3, 2),   # a single target crop
])
def test_value_and_gradient_match_the_official_loop(num_teacher, num_student, num_images):
    student = random_logits(num_student, num_images, 7, seed=num_student)
    targets = random_targets(num_teacher, num_images, 7, seed=num_teacher)
    assert_matches_reference(student, targets, student_temp=0.1)
    assert_matches_reference(student, targets, student_temp=1.0)


def test_one_hot_targets_give_the_mean_log_likelihood_of_their_class_over_the_pairs():
    student = random_logits(6, 4, 5, seed=3)
    classes = torch.tensor([[0, 3, 4, 1], [2, 2, 0, 4]])
    targets = torch.nn.functional.one_hot(classes, 5).double()
    log_p = torch.log_softmax(student / 0.1, dim=-1)
    pairs = cross_view_pairs(2, 6)
    expected = sum(-log_p[j, n, classes[i, n]] for i, j in pairs for n in range(4)) / (len(pairs) * 4)
    torch.testing.assert_close(dino_loss(student, targets, 0.1), expected, rtol=1e-12, atol=1e-12)
    assert_matches_reference(student, targets)


def test_the_loss_sums_exactly_the_pairs_of_different_crops():
    # per-pair cross-entropies (batch means); the loss is their mean over the pairs (i, j), i != j
    student, targets = random_logits(5, 3, 4, seed=4), random_targets(2, 3, 4, seed=5)
    log_p = torch.log_softmax(student / 0.1, dim=-1)
    cross = -torch.einsum("ink,jnk->ij", targets, log_p) / 3
    assert cross_view_pairs(2, 5) == [(0, 1), (0, 2), (0, 3), (0, 4), (1, 0), (1, 2), (1, 3), (1, 4)]
    expected = sum(cross[i, j] for i, j in cross_view_pairs(2, 5)) / 8
    torch.testing.assert_close(dino_loss(student, targets, 0.1), expected, rtol=1e-12, atol=1e-12)
    including_own_crops = cross.sum() / 10  # what the loss would be if (0, 0) and (1, 1) counted
    assert not torch.isclose(dino_loss(student, targets, 0.1), including_own_crops)


def test_no_gradient_reaches_the_targets_and_float32_under_autocast():
    student = random_logits(4, 3, 6, seed=6).float().requires_grad_(True)
    targets = random_targets(2, 3, 6, seed=7).float().requires_grad_(True)
    loss = dino_loss(student, targets)
    student_grad, target_grad = torch.autograd.grad(loss, [student, targets], allow_unused=True)
    assert target_grad is None and student_grad is not None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = dino_loss(student.bfloat16(), targets.bfloat16())
    assert under_autocast.dtype == torch.float32
    exact = reference_dino_loss(student.detach().bfloat16().double(), targets.detach().bfloat16().double(), 0.1)
    torch.testing.assert_close(under_autocast.double(), exact, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("student_shape, target_shape, kwargs, match", [
    ((2, 3, 4), (2, 3, 5), {}, r"same N images and K outputs.*\(2, 3, 4\) and \(2, 3, 5\)"),
    ((3, 4), (2, 3, 4), {}, r"\[S, N, K\]"),
    ((2, 3, 4), (3, 3, 4), {}, "got 3 teacher and 2 student crops"),
    ((1, 3, 4), (1, 3, 4), {}, "at least 2 student crops"),
    ((2, 3, 4), (2, 3, 4), {"student_temperature": 0.0}, "student temperature > 0, got 0"),
])
def test_loss_rejects_bad_input(student_shape, target_shape, kwargs, match):
    with pytest.raises(ValueError, match=match):
        dino_loss(torch.randn(student_shape), torch.rand(target_shape), **kwargs)


# ---------------------------------------------------------------- targets and centre


def reference_softmax(row):
    exps = [math.exp(x) for x in row]
    return [e / sum(exps) for e in exps]


def test_centred_targets_are_the_softmax_of_the_centred_logits_over_the_temperature():
    teacher = random_logits(2, 3, 5, seed=8, scale=0.5)
    centre = torch.tensor([[0.1, -0.2, 0.3, 0.0, 0.05]], dtype=torch.float64)
    targets = dino_teacher_targets(teacher, 0.04, "centre", centre)
    for i in range(2):
        for n in range(3):
            row = [(teacher[i, n, k] - centre[0, k]).item() / 0.04 for k in range(5)]
            torch.testing.assert_close(targets[i, n], torch.tensor(reference_softmax(row), dtype=torch.float64),
                                       rtol=1e-10, atol=1e-12)
    uncentred = dino_teacher_targets(teacher, 0.07, "none")
    torch.testing.assert_close(uncentred, torch.softmax(teacher / 0.07, dim=-1), rtol=1e-12, atol=1e-12)
    assert not dino_teacher_targets(teacher.requires_grad_(True), 0.04, "none").requires_grad


def test_the_centre_update_is_the_momentum_average_with_the_mean_teacher_output():
    teacher = random_logits(2, 4, 6, seed=9)
    centre = torch.randn(1, 6, dtype=torch.float64)
    expected = centre.clone()
    column_sums = [0.0] * 6
    for i in range(2):
        for n in range(4):
            for k in range(6):
                column_sums[k] += teacher[i, n, k].item()
    for k in range(6):
        expected[0, k] = 0.9 * centre[0, k] + 0.1 * column_sums[k] / 8
    torch.testing.assert_close(dino_centre_update(centre, teacher, 0.9), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dino_centre_update(centre, teacher, 1.0), centre)  # momentum 1: frozen
    # float32 centre, bf16 outputs under autocast: the mean is taken in float32 and the centre stays float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        updated = dino_centre_update(centre.float(), teacher.bfloat16(), 0.9)
    assert updated.dtype == torch.float32
    torch.testing.assert_close(updated.double(), dino_centre_update(centre, teacher.bfloat16().double(), 0.9),
                               rtol=1e-6, atol=1e-6)


def reference_dinov2_sinkhorn(teacher_output: np.ndarray, teacher_temp: float, iterations: int) -> np.ndarray:
    """DINOv2's ``sinkhorn_knopp_teacher`` on one process: rows are the samples of every crop together."""
    q = np.exp(teacher_output / teacher_temp).T  # [K, B]
    num_outputs, num_samples = q.shape
    q = q / q.sum()
    for _ in range(iterations):
        q = q / q.sum(axis=1, keepdims=True) / num_outputs
        q = q / q.sum(axis=0, keepdims=True) / num_samples
    return (q * num_samples).T


def test_sinkhorn_option_is_the_shared_sinkhorn_knopp_over_every_global_crop_at_once():
    teacher = random_logits(2, 5, 4, seed=10, scale=0.1)
    targets = dino_teacher_targets(teacher, 0.05, "sinkhorn_knopp", sinkhorn_iterations=3)
    shared = sinkhorn_knopp(teacher.reshape(10, 4), epsilon=0.05, iterations=3).view(2, 5, 4)
    torch.testing.assert_close(targets, shared, rtol=0, atol=0)
    expected = reference_dinov2_sinkhorn(teacher.reshape(10, 4).numpy(), 0.05, 3).reshape(2, 5, 4)
    torch.testing.assert_close(targets, torch.from_numpy(expected), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kwargs, match", [
    ({"centering": "mean"}, "Unknown centering 'mean'"),
    ({"centering": "centre"}, "needs the running centre"),
    ({"centering": "none", "centre": torch.zeros(1, 4)}, "takes no centre"),
    ({"centering": "none", "temperature": 0.0}, "teacher temperature > 0, got 0.0"),
])
def test_targets_reject_bad_input(kwargs, match):
    arguments = {"temperature": 0.04, **kwargs}
    with pytest.raises(ValueError, match=match):
        dino_teacher_targets(torch.randn(2, 3, 4), **arguments)


def test_targets_and_centre_reject_wrong_shapes():
    with pytest.raises(ValueError, match=r"teacher logits \[T, N, K\]"):
        dino_teacher_targets(torch.randn(3, 4), 0.04, "none")
    with pytest.raises(ValueError, match="a centre of 5 entries for 4 outputs"):
        dino_centre_update(torch.zeros(1, 5), torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="0 <= momentum <= 1, got 1.5"):
        dino_centre_update(torch.zeros(1, 4), torch.randn(2, 3, 4), 1.5)
