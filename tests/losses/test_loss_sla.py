"""SLA (Lee et al. 2020): the rotated batch, the joint labels and the reading of class logits out of joint
logits (components.rotation) against loops; the joint loss and SLA+SD's terms against float64 references
and against the official trainer's loss written out; edge cases (equal logits, unlabelled rows masked
without a host sync, one class, T 1 against 4); bad input; two ranks."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ssl_lightning.components.rotation import (
    aggregated_logits,
    class_logits_at,
    joint_labels,
    per_rotation_class_logits,
    rotate_batch,
    single_logits,
)
from ssl_lightning.losses.sla import sla_joint_loss, sla_sd_loss, sla_sd_terms

from helpers.gloo import assert_global_batch_value_and_gradients, run_on_two_ranks
from helpers.host_syncs import HostSyncCounter


def randn(*shape, seed=0, scale=2.0):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ----------------------------------------------------------------- the rotated batch and the joint labels
def test_rotated_batch_holds_each_images_four_quarter_turns_in_consecutive_rows():
    images = randn(3, 2, 5, 5)
    rotated = rotate_batch(images)
    assert rotated.shape == (12, 2, 5, 5)
    for i in range(3):
        turned = images[i]
        for j in range(4):
            assert torch.equal(rotated[4 * i + j], turned)
            turned = turned.transpose(-1, -2).flip(-2)  # a quarter turn counter-clockwise, written out


def test_a_quarter_turn_is_counter_clockwise():
    image = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    assert rotate_batch(image)[1, 0].tolist() == [[2.0, 4.0], [1.0, 3.0]]


def test_joint_labels_are_4y_plus_the_rotation_and_unlabelled_stays_unlabelled():
    labels = torch.tensor([2, -1, 0, 5])
    expected = []
    for y in labels.tolist():
        expected += [4 * y + j if y >= 0 else -1 for j in range(4)]
    assert joint_labels(labels).tolist() == expected


# ----------------------------------------------------------------- reading class logits
def test_per_rotation_logits_read_each_rotated_input_at_its_own_rotation():
    joint = randn(8, 12, seed=1)  # 2 images, 3 classes
    read = per_rotation_class_logits(joint)
    assert read.shape == (2, 4, 3)
    for i in range(2):
        for j in range(4):
            for c in range(3):
                assert read[i, j, c] == joint[4 * i + j, 4 * c + j]


def test_aggregation_equals_the_mean_of_the_per_rotation_joint_logits():
    joint = randn(12, 20, seed=2)  # 3 images, 5 classes
    expected = torch.zeros(3, 5, dtype=torch.float64)
    for i in range(3):
        for c in range(5):
            expected[i, c] = sum(joint[4 * i + j, 4 * c + j] for j in range(4)) / 4
    torch.testing.assert_close(aggregated_logits(joint), expected, rtol=0, atol=1e-15)
    official = sum(joint[j::4, j::4] / 4 for j in range(4))  # hankook/SLA trainers.py: agg_preds
    torch.testing.assert_close(aggregated_logits(joint), official, rtol=0, atol=1e-15)


def test_single_inference_reads_rotation_zero():
    joint = randn(12, 20, seed=3)
    expected = torch.stack([torch.stack([joint[4 * i, 4 * c] for c in range(5)]) for i in range(3)])
    assert torch.equal(single_logits(joint), expected)
    assert torch.equal(single_logits(joint), joint[::4, ::4])  # the official single_preds
    # on un-rotated images: the same entries, read without rotating the batch
    assert torch.equal(class_logits_at(joint[0::4], 0), expected)
    assert torch.equal(class_logits_at(joint, 2), joint[:, 2::4])


@pytest.mark.parametrize("call,shape,match", [
    (rotate_batch, (2, 1, 4, 5), "square images"),
    (rotate_batch, (2, 4, 4), "square images"),
    (per_rotation_class_logits, (6, 8), "rotated batch"),
    (per_rotation_class_logits, (8, 6), "4 columns per class"),
    (lambda x: class_logits_at(x, 0), (3, 7), "4 columns per class"),
])
def test_bad_shapes_are_refused_with_the_fix(call, shape, match):
    with pytest.raises(ValueError, match=match):
        call(torch.zeros(shape))


def test_float_labels_are_refused():
    with pytest.raises(ValueError, match="integer class labels"):
        joint_labels(torch.zeros(3))


# ----------------------------------------------------------------- the losses against plain references
def log_softmax_row(row, temperature=1.0):
    row = row / temperature
    return row - torch.log(torch.exp(row).sum())


def reference_terms(joint, single, labels, temperature):
    """Loops over the images: the joint CE over labelled rows 4i + j (label 4y + j), the single-label CE
    over labelled images, and T^2 x the mean over every image of KL(softmax(a/T) || softmax(u/T)) with a
    the mean over j of joint[4i + j, 4c + j] (detached)."""
    joint_sum, single_sum, count, distill = 0.0, 0.0, 0, 0.0
    for i, y in enumerate(labels.tolist()):
        aggregated = torch.stack([sum(joint[4 * i + j, 4 * c + j] for j in range(4)) / 4
                                  for c in range(single.shape[1])]).detach()
        q = torch.exp(log_softmax_row(aggregated, temperature))
        distill = distill + temperature**2 * (q * (torch.log(q) - log_softmax_row(single[i], temperature))).sum()
        if y < 0:
            continue
        for j in range(4):
            joint_sum = joint_sum - log_softmax_row(joint[4 * i + j])[4 * y + j]
        single_sum = single_sum - log_softmax_row(single[i])[y]
        count += 1
    zero = 0 * (joint.sum() + single.sum())
    return (joint_sum / max(4 * count, 1) + zero, single_sum / max(count, 1) + zero, distill / len(labels) + zero)


def values_and_grads(terms_fn, joint, single, labels, temperature):
    joint, single = joint.clone().requires_grad_(True), single.clone().requires_grad_(True)
    terms = terms_fn(joint, single, labels, temperature)
    return [*terms, *[g for t in terms for g in grads_of(t, (joint, single))]]


def grads_of(term, inputs):
    """Gradients of ``term`` for each input, zeros for an input it does not use."""
    grads = torch.autograd.grad(term, inputs, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]


def assert_same(actual, expected):
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


LABELS = {"labelled": [0, 2, 1, 2], "some unlabelled": [-1, 2, -1, 0], "none labelled": [-1, -1, -1, -1]}


@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("labels", list(LABELS.values()), ids=list(LABELS))
def test_sd_terms_and_gradients_match_the_reference(labels, temperature):
    joint, single, labels = randn(16, 12, seed=4), randn(4, 3, seed=5), torch.tensor(labels)
    actual = values_and_grads(sla_sd_terms, joint, single, labels, temperature)
    assert_same(actual, values_and_grads(reference_terms, joint, single, labels, temperature))
    # the distillation's target is detached: it trains the single-label head only
    assert torch.count_nonzero(actual[7]) == 0 and actual[8].abs().max() > 1e-3


@pytest.mark.parametrize("labels", list(LABELS.values()), ids=list(LABELS))
def test_joint_loss_is_the_sd_joint_term(labels):
    joint, labels = randn(16, 12, seed=6).requires_grad_(True), torch.tensor(labels)
    loss = sla_joint_loss(joint, labels)
    reference = reference_terms(joint, randn(4, 3, seed=7), labels, 1.0)[0]
    torch.testing.assert_close(loss, reference, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(loss, joint)[0], torch.autograd.grad(reference, joint)[0],
                               rtol=1e-10, atol=1e-12)


def official_sd_loss(joint_preds, single_preds, single_labels, T):
    """hankook/SLA trainers.py create_sla_sd_trainer, written out (every image labelled, n = 4)."""
    n = 4
    joint_labels_ = torch.stack([single_labels * n + i for i in range(n)], 1).view(-1)
    joint_loss = F.cross_entropy(joint_preds, joint_labels_)
    single_loss = F.cross_entropy(single_preds, single_labels)
    agg_preds = 0
    for i in range(n):
        agg_preds = agg_preds + joint_preds[i::n, i::n] / n
    distillation_loss = F.kl_div(F.log_softmax(single_preds / T, 1), F.softmax(agg_preds.detach() / T, 1),
                                 reduction="batchmean")
    return joint_loss + single_loss + distillation_loss.mul(T**2)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_sd_loss_matches_the_official_trainer(temperature):
    joint, single, labels = randn(20, 28, seed=8), randn(5, 7, seed=9), torch.tensor([6, 0, 3, 3, 1])
    values = []
    for loss_fn in (sla_sd_loss, official_sd_loss):
        j, s = joint.clone().requires_grad_(True), single.clone().requires_grad_(True)
        loss = loss_fn(j, s, labels, temperature)
        values += [loss, *torch.autograd.grad(loss, (j, s))]
    assert_same(values[:3], values[3:])


def test_equal_logits_give_log_class_counts_and_no_distillation():
    joint, single, labels = torch.zeros(8, 12, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64), \
        torch.tensor([1, 2])
    values = values_and_grads(sla_sd_terms, joint, single, labels, 1.0)
    assert_same(values, values_and_grads(reference_terms, joint, single, labels, 1.0))
    torch.testing.assert_close(values[0], torch.log(torch.tensor(12.0, dtype=torch.float64)))
    torch.testing.assert_close(values[1], torch.log(torch.tensor(3.0, dtype=torch.float64)))
    assert values[2].abs() < 1e-15 and values[8].abs().max() < 1e-15  # the KL at its minimum


def test_one_class_leaves_only_the_rotation_task():
    joint, single, labels = randn(8, 4, seed=10), randn(2, 1, seed=11), torch.tensor([0, 0])
    values = values_and_grads(sla_sd_terms, joint, single, labels, 1.0)
    assert_same(values, values_and_grads(reference_terms, joint, single, labels, 1.0))
    assert values[0] > 0.1 and values[1].abs() < 1e-15 and values[2].abs() < 1e-15


def test_masking_unlabelled_rows_makes_no_host_sync():
    joint, single = randn(16, 12, seed=12).float().requires_grad_(True), randn(4, 3, seed=13).float()
    counter = HostSyncCounter()
    counter.counting = True
    with counter:
        loss = sla_sd_loss(joint, single, torch.tensor([-1, 2, -1, 0]))
        loss = loss + sla_joint_loss(joint, torch.tensor([1, -1, 0, 0]))
        loss.backward()
    assert counter.total() == 0, dict(counter.seen)


def test_half_precision_inputs_give_a_float32_loss():
    joint, single = randn(8, 12, seed=14).bfloat16(), randn(2, 3, seed=15).bfloat16()
    assert all(t.dtype == torch.float32 for t in sla_sd_terms(joint, single, torch.tensor([0, 1])))


@pytest.mark.parametrize("joint_shape,single_shape,labels,match", [
    ((12, 12), (4, 3), [0, 1, 2, 0], "joint_logits \\[4 B, 4 C\\]"),  # 12 rows for 4 images
    ((16, 10), (4, 3), [0, 1, 2, 0], "joint_logits \\[4 B, 4 C\\]"),  # not 4 columns per class
    ((16, 12), (4, 4), [0, 1, 2, 0], "single_logits \\[B, C\\] = \\[4, 3\\]"),
    ((16, 12), (3, 3), [0, 1, 2, 0], "single_logits"),
])
def test_bad_inputs_are_refused_with_what_is_expected(joint_shape, single_shape, labels, match):
    with pytest.raises(ValueError, match=match):
        sla_sd_terms(torch.zeros(joint_shape), torch.zeros(single_shape), torch.tensor(labels))
    with pytest.raises(ValueError, match="temperature > 0"):
        sla_sd_terms(torch.zeros(16, 12), torch.zeros(4, 3), torch.tensor([0, 1, 2, 0]), 0.0)


# ----------------------------------------------------------------- two ranks
SHARDS = [2, 3]  # images per rank (8 and 12 rotated rows); rank 0 has no labelled image


def sd_inputs():
    joints = [randn(4 * n, 12, seed=20 + n) for n in SHARDS]
    singles = [randn(n, 3, seed=30 + n) for n in SHARDS]
    labels = [torch.tensor([-1, -1]), torch.tensor([2, -1, 0])]
    return joints, singles, labels


def sd_terms_on_one_rank(joints, singles, labels):
    rank = dist.get_rank()
    joint, single = joints[rank].clone().requires_grad_(True), singles[rank].clone().requires_grad_(True)
    results = []
    for term in sla_sd_terms(joint, single, labels[rank], 2.0):
        grads = grads_of(term, (joint, single))
        results.append({"loss": term.detach(), "grad": torch.cat([grads[0].flatten(), grads[1].flatten()])})
    return results


@pytest.mark.ddp
@pytest.mark.timeout(120)
def test_two_ranks_give_the_global_batch_terms_and_gradients(tmp_path):
    joints, singles, labels = sd_inputs()
    results = run_on_two_ranks(sd_terms_on_one_rank, tmp_path, joints, singles, labels)
    joint, single = torch.cat(joints).requires_grad_(True), torch.cat(singles).requires_grad_(True)
    for k, term in enumerate(sla_sd_terms(joint, single, torch.cat(labels), 2.0)):
        assert term.abs() > 1e-3
        g_joint, g_single = grads_of(term, (joint, single))
        # each rank's flattened gradient: its joint rows, then its single rows
        per_rank, start_j, start_s = [], 0, 0
        for n in SHARDS:
            per_rank.append(torch.cat([g_joint[start_j:start_j + 4 * n].flatten(),
                                       g_single[start_s:start_s + n].flatten()]))
            start_j, start_s = start_j + 4 * n, start_s + n
        assert_global_batch_value_and_gradients([r[k] for r in results], term.detach(), torch.cat(per_rank),
                                                [p.numel() for p in per_rank])
