"""PS-KD's targets, a_t and loss (Kim et al. 2021) against plain references: the targets and the loss's
value and gradient in float64 row by row, the official Custom_CrossEntropy_PSKD written out, a_t's
schedule, the edge cases (a_t = 0 is plain cross-entropy exactly, unlabelled rows, a one-hot or
uniform past prediction, one class), a two-rank check and the errors for bad inputs."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ssl_lightning.losses import labelled_cross_entropy
from ssl_lightning.losses.pskd import pskd_alpha, pskd_loss, pskd_targets

from helpers.gloo import assert_global_batch_value_and_gradients, run_on_two_ranks


def logits(rows, classes, seed, scale=2.0):
    return scale * torch.randn(rows, classes, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def past_predictions(rows, classes, seed):
    return torch.softmax(logits(rows, classes, seed), dim=1)


def reference_targets(labels, previous, alpha):
    """Entry by entry: (1 - a) [c == y] + a p_c for a labelled row, zeros for an unlabelled one."""
    rows, classes = previous.shape
    targets = torch.zeros(rows, classes, dtype=torch.float64)
    for i in range(rows):
        y = int(labels[i])
        if y < 0:
            continue
        for c in range(classes):
            targets[i, c] = (1 - alpha) * (1.0 if c == y else 0.0) + alpha * previous[i, c]
    return targets


def reference_loss(student, labels, previous, alpha):
    """Mean over the labelled rows of - sum_c target_c log softmax_c; zero (with a graph) if none."""
    targets = reference_targets(labels, previous, alpha)
    total, count = student.sum() * 0, 0
    for i in range(student.shape[0]):
        if labels[i] < 0:
            continue
        log_p = student[i] - torch.logsumexp(student[i], 0)
        total = total - sum(targets[i, c] * log_p[c] for c in range(student.shape[1]))
        count += 1
    return total / max(count, 1)


def official_loss(student, labels, previous, alpha):
    """lgcnsai/PS-KD-Pytorch main.py's soft targets and loss/pskd_loss.py's loss (all rows labelled)."""
    targets_one_hot = torch.eye(student.shape[1], dtype=student.dtype)[labels]
    soft_targets = ((1 - alpha) * targets_one_hot) + (alpha * previous)
    return (-soft_targets * F.log_softmax(student, dim=1)).mean(0).sum()


def value_and_grad(loss_fn, student, labels, previous, alpha):
    student = student.clone().requires_grad_(True)
    loss = loss_fn(student, labels, previous, alpha)
    return loss, torch.autograd.grad(loss, student)[0]


def assert_same(actual, expected):
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------- a_t
def test_alpha_rises_linearly_to_alpha_T_in_the_last_epoch():
    assert [pskd_alpha(t, 300) for t in (0, 1, 149, 298, 299)] == pytest.approx([0.8 / 300, 1.6 / 300, 0.4,
                                                                                 0.8 * 299 / 300, 0.8])
    assert pskd_alpha(0, 1) == pytest.approx(0.8) and pskd_alpha(3, 4, 0.5) == pytest.approx(0.5)
    assert pskd_alpha(9, 10, 0.0) == 0.0


# ----------------------------------------------------------------- targets, value, gradient
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.8, 1.0])
@pytest.mark.parametrize("labels", [[0, 2, 1, 3, 2], [-1, 2, -1, 0, 3], [3, -1, -1, -1, -1]])
def test_targets_loss_and_gradient_match_the_reference(labels, alpha):
    labels, previous = torch.tensor(labels), past_predictions(5, 4, 1)
    targets = pskd_targets(labels, previous, alpha)
    torch.testing.assert_close(targets, reference_targets(labels, previous, alpha), rtol=0, atol=1e-15)
    labelled = labels >= 0
    torch.testing.assert_close(targets.sum(1), labelled.double(), rtol=0, atol=1e-12)  # distributions
    assert_same(value_and_grad(pskd_loss, logits(5, 4, 0), labels, previous, alpha),
                value_and_grad(reference_loss, logits(5, 4, 0), labels, previous, alpha))


@pytest.mark.parametrize("alpha", [0.1, 0.8])
def test_the_loss_matches_the_official_code(alpha):
    student, labels, previous = logits(6, 7, 2), torch.tensor([0, 6, 3, 3, 1, 5]), past_predictions(6, 7, 3)
    assert_same(value_and_grad(pskd_loss, student, labels, previous, alpha),
                value_and_grad(official_loss, student, labels, previous, alpha))


def test_no_gradient_flows_into_the_past_predictions():
    student, previous = logits(4, 5, 4).requires_grad_(True), past_predictions(4, 5, 5).requires_grad_(True)
    loss = pskd_loss(student, torch.tensor([0, 1, 2, 3]), previous, 0.5)
    grads = torch.autograd.grad(loss, (student, previous), allow_unused=True)
    assert grads[1] is None and grads[0].abs().sum() > 0


# ----------------------------------------------------------------- edge cases
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_alpha_zero_is_plain_cross_entropy_exactly(dtype):
    student, labels = logits(6, 5, 6).to(dtype), torch.tensor([4, 0, -1, 2, 2, 1])
    previous = past_predictions(6, 5, 7).to(dtype)
    actual = value_and_grad(pskd_loss, student, labels, previous, 0.0)
    expected = value_and_grad(lambda s, y, p, a: labelled_cross_entropy(s, y), student, labels, previous, 0.0)
    assert torch.equal(actual[0], expected[0])
    torch.testing.assert_close(actual[1], expected[1], rtol=0, atol=1e-15 if dtype == torch.float64 else 1e-7)


@pytest.mark.parametrize("alpha", [0.2, 1.0])
def test_a_one_hot_past_prediction_of_the_label_is_plain_cross_entropy(alpha):
    student, labels = logits(4, 5, 8), torch.tensor([4, 0, 2, 1])
    previous = F.one_hot(labels, 5).double()
    assert_same(value_and_grad(pskd_loss, student, labels, previous, alpha),
                value_and_grad(lambda s, y, p, a: F.cross_entropy(s, y), student, labels, previous, alpha))


def test_a_one_hot_past_prediction_of_another_class_splits_the_target():
    labels, previous = torch.tensor([0, 3]), F.one_hot(torch.tensor([2, 1]), 4).double()
    expected = torch.tensor([[0.7, 0.0, 0.3, 0.0], [0.0, 0.3, 0.0, 0.7]], dtype=torch.float64)
    torch.testing.assert_close(pskd_targets(labels, previous, 0.3), expected, rtol=0, atol=1e-15)
    student = logits(2, 4, 9)
    assert_same(value_and_grad(pskd_loss, student, labels, previous, 0.3),
                value_and_grad(reference_loss, student, labels, previous, 0.3))


def test_an_unlabelled_batch_gives_zero_with_a_graph():
    student = logits(3, 4, 10).requires_grad_(True)
    loss = pskd_loss(student, torch.full((3,), -1), past_predictions(3, 4, 11), 0.5)
    (grad,) = torch.autograd.grad(loss, student)
    assert loss.item() == 0.0 and torch.count_nonzero(grad) == 0


def test_one_class_gives_zero_loss_and_gradient():
    loss, grad = value_and_grad(pskd_loss, logits(3, 1, 12), torch.zeros(3, dtype=torch.long),
                                torch.ones(3, 1, dtype=torch.float64), 0.8)
    assert loss.abs() < 1e-15 and grad.abs().max() < 1e-15


def test_half_precision_inputs_give_a_float32_loss():
    student, labels, previous = logits(4, 5, 13), torch.tensor([0, 1, 2, 3]), past_predictions(4, 5, 14)
    half = pskd_loss(student.to(torch.bfloat16), labels, previous.float(), 0.5)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half.double(), pskd_loss(student.to(torch.bfloat16).double(), labels, previous, 0.5),
                               rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------- bad input
@pytest.mark.parametrize("call,message", [
    (lambda: pskd_alpha(0, 0), r"total_epochs >= 1 \(the run's epochs, T\)"),
    (lambda: pskd_alpha(-1, 10), "0-based epoch >= 0"),
    (lambda: pskd_alpha(0, 10, 1.5), r"alpha_T in \[0, 1\] \(the paper's 0.8\)"),
    (lambda: pskd_targets(torch.tensor([0, 1]), torch.ones(2, 3) / 3, 1.2), r"alpha in \[0, 1\]"),
    (lambda: pskd_targets(torch.tensor([0.0, 1.0]), torch.ones(2, 3) / 3, 0.5), "integer labels"),
    (lambda: pskd_targets(torch.tensor([0, 1, 2]), torch.ones(2, 3) / 3, 0.5), r"labels .* of shape \(3,\)"),
    (lambda: pskd_loss(torch.zeros(2, 4), torch.tensor([0, 1]), torch.ones(2, 3) / 3, 0.5),
     r"same shape \[N, C\], got \(2, 4\) and \(2, 3\)"),
])
def test_bad_inputs_are_refused_with_what_to_fix(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ----------------------------------------------------------------- two ranks
SHARD_SIZES = [3, 5]


def make_shards():
    student, previous = logits(8, 6, 15), past_predictions(8, 6, 16)
    labels = torch.tensor([-1, -1, -1, 2, -1, 0, 5, 1])  # rank 0 has no labelled row
    cut = SHARD_SIZES[0]
    return [(student[:cut], labels[:cut], previous[:cut]), (student[cut:], labels[cut:], previous[cut:])]


def loss_on_this_rank(shards):
    student, labels, previous = shards[dist.get_rank()]
    student = student.clone().requires_grad_(True)
    loss = pskd_loss(student, labels, previous, 0.6)
    return {"loss": loss.detach(), "grad": torch.autograd.grad(loss, student)[0]}


@pytest.mark.ddp
@pytest.mark.timeout(120)
def test_two_ranks_give_the_global_batch_value_and_gradients(tmp_path):
    shards = make_shards()
    results = run_on_two_ranks(loss_on_this_rank, tmp_path, shards)
    student, labels, previous = (torch.cat(parts) for parts in zip(*shards))
    loss, grad = value_and_grad(pskd_loss, student, labels, previous, 0.6)
    assert loss.abs() > 1e-3
    assert_global_batch_value_and_gradients(results, loss.detach(), grad, SHARD_SIZES)
