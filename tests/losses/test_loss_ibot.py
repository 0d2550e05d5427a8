"""iBOT's patch loss and patch targets against the official loss written out plainly (float64): each crop's
mean over its masked patches, then the mean over the crops; indifference to unmasked patches; one-hot
targets; every / no patch masked; the centred, sharpened targets and DINOv2's Sinkhorn-Knopp over the
masked patches only; and on two gloo ranks (uneven shards) the patch centre's update, the Sinkhorn targets
and the loss's value and averaged gradient against one process."""

import pytest
import torch
import torch.distributed as dist

from ssl_lightning.losses.dino import dino_centre_update
from ssl_lightning.losses.ibot import ibot_patch_loss, ibot_patch_targets
from ssl_lightning.losses.sinkhorn import sinkhorn_knopp

from helpers.gloo import WORLD_SIZE, run_on_two_ranks


def reference_patch_loss(student, targets, masks, student_temp):
    """bytedance/ibot ``iBOTLoss.forward``'s patch term, one crop and patch at a time: for crop c,
    sum over masked patches of -sum_k q log softmax(s / T_s), divided by max(1, its masked patches);
    the mean over the crops."""
    num_crops, num_patches, _ = student.shape
    total = 0.0
    for c in range(num_crops):
        crop_sum, crop_masked = 0.0, 0
        for p in range(num_patches):
            if not masks[c, p]:
                continue
            logits = student[c, p] / student_temp
            log_p = logits - torch.log(torch.exp(logits).sum())
            crop_sum = crop_sum - (targets[c, p] * log_p).sum()
            crop_masked += 1
        total = total + crop_sum / max(1, crop_masked)
    return total / num_crops


def random_inputs(num_crops=5, num_patches=6, num_outputs=7, seed=0, mask_fraction=0.4):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(num_crops, num_patches, num_outputs, generator=generator, dtype=torch.float64) * 3
    targets = torch.rand(num_crops, num_patches, num_outputs, generator=generator, dtype=torch.float64)
    targets = targets / targets.sum(dim=-1, keepdim=True)
    masks = torch.rand(num_crops, num_patches, generator=generator) < mask_fraction
    return student, targets, masks


def value_and_grad(loss_fn, student, targets, masks, student_temp=0.1):
    student = student.clone().requires_grad_(True)
    loss = loss_fn(student, targets, masks, student_temp)
    return loss, torch.autograd.grad(loss, student)[0]


def assert_matches_reference(student, targets, masks, student_temp=0.1):
    loss, grad = value_and_grad(ibot_patch_loss, student, targets, masks, student_temp)
    expected, expected_grad = value_and_grad(reference_patch_loss, student, targets, masks, student_temp)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- the loss


@pytest.mark.parametrize("num_crops, num_patches, num_outputs", [(5, 6, 7), (1, 4, 3), (2, 16, 5), (8, 1, 4)])
@pytest.mark.parametrize("student_temp", [0.1, 1.0])
def test_value_and_gradient_match_the_official_loss(num_crops, num_patches, num_outputs, student_temp):
    student, targets, masks = random_inputs(num_crops, num_patches, num_outputs, seed=num_crops + num_patches)
    masks[0, 0] = True  # at least one masked patch
    assert_matches_reference(student, targets, masks, student_temp)


def test_the_loss_ignores_unmasked_positions_whatever_their_targets():
    student, targets, masks = random_inputs(seed=3)
    loss, grad = value_and_grad(ibot_patch_loss, student, targets, masks)
    changed = targets.clone()
    other = torch.rand(changed.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    changed[~masks] = (other / other.sum(dim=-1, keepdim=True))[~masks]  # new distributions at unmasked patches
    assert not torch.equal(changed, targets)
    loss_changed, grad_changed = value_and_grad(ibot_patch_loss, student, changed, masks)
    assert torch.equal(loss_changed, loss) and torch.equal(grad_changed, grad)
    # and the student's unmasked patches get no gradient
    assert torch.all(grad[~masks] == 0) and torch.all(grad[masks].abs().sum(dim=-1) > 0)
    # while changing a masked patch's target does move it
    crop, patch = masks.nonzero()[0].tolist()
    changed[crop, patch] = torch.tensor([1.0] + [0.0] * 6)
    assert value_and_grad(ibot_patch_loss, student, changed, masks)[0] != loss


def test_one_hot_targets_give_each_crops_mean_negative_log_likelihood_over_its_masked_patches():
    student, _, masks = random_inputs(num_crops=4, num_patches=5, num_outputs=6, seed=5, mask_fraction=0.5)
    masks[:, 0] = True
    classes = torch.randint(0, 6, (4, 5), generator=torch.Generator().manual_seed(1))
    targets = torch.nn.functional.one_hot(classes, 6).double()
    log_p = torch.log_softmax(student / 0.1, dim=-1).gather(-1, classes.unsqueeze(-1)).squeeze(-1)
    expected = torch.stack([-log_p[c][masks[c]].mean() for c in range(4)]).mean()
    torch.testing.assert_close(ibot_patch_loss(student, targets, masks, 0.1), expected, rtol=1e-12, atol=1e-12)


def test_every_patch_masked_is_the_mean_over_all_patches_and_no_patch_masked_gives_zero():
    student, targets, _ = random_inputs(seed=7)
    everything = torch.ones(student.shape[:2], dtype=torch.bool)
    cross = -(targets * torch.log_softmax(student / 0.1, dim=-1)).sum(dim=-1)
    torch.testing.assert_close(ibot_patch_loss(student, targets, everything), cross.mean(), rtol=1e-12, atol=1e-12)
    assert_matches_reference(student, targets, everything)

    nothing = torch.zeros(student.shape[:2], dtype=torch.bool)
    loss, grad = value_and_grad(ibot_patch_loss, student, targets, nothing)
    assert loss.item() == 0.0 and torch.all(grad == 0)
    # an unmasked crop counts 0 in the mean over crops (iBOT averages over all crops, masked or not)
    some = nothing.clone()
    some[0] = True
    torch.testing.assert_close(ibot_patch_loss(student, targets, some), cross[0].mean() / student.shape[0])


def test_float_masks_equal_bool_masks_and_bf16_inputs_give_a_float32_loss():
    student, targets, masks = random_inputs(seed=11)
    torch.testing.assert_close(ibot_patch_loss(student, targets, masks.double()), ibot_patch_loss(student, targets, masks))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ibot_patch_loss(student.bfloat16(), targets.bfloat16(), masks)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ibot_patch_loss(student, targets, masks), rtol=2e-2, atol=2e-2)


def test_bad_inputs_name_the_expected_shapes():
    student, targets, masks = random_inputs()
    with pytest.raises(ValueError, match=r"same shape \[C, L, K\]"):
        ibot_patch_loss(student, targets[:, :-1], masks)
    with pytest.raises(ValueError, match=r"masks \[C, L\] = \(5, 6\)"):
        ibot_patch_loss(student, targets, masks[:, :-1])
    with pytest.raises(ValueError, match="student temperature > 0"):
        ibot_patch_loss(student, targets, masks, 0.0)


# ---------------------------------------------------------------- the targets


def test_centred_targets_are_the_softmax_of_the_centred_sharpened_logits_for_every_patch():
    teacher, _, _ = random_inputs(seed=13)
    centre = torch.randn(1, 7, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    targets = ibot_patch_targets(teacher, 0.04, "centre", centre)
    for c in range(teacher.shape[0]):
        for p in range(teacher.shape[1]):
            logits = (teacher[c, p] - centre[0]) / 0.04
            expected = torch.exp(logits - logits.max()) / torch.exp(logits - logits.max()).sum()
            torch.testing.assert_close(targets[c, p], expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ibot_patch_targets(teacher, 0.5, "none"), torch.softmax(teacher / 0.5, dim=-1))


def test_sinkhorn_targets_are_sinkhorn_knopp_over_the_masked_teacher_patches_only():
    # DINOv2's ibot_patch_loss.sinkhorn_knopp_teacher: the masked patches' outputs, B = their number
    teacher, _, masks = random_inputs(num_crops=6, num_patches=9, num_outputs=5, seed=17)
    positions = masks.flatten().nonzero().squeeze(1)
    targets = ibot_patch_targets(teacher, 0.05, "sinkhorn_knopp", masked_positions=positions, sinkhorn_iterations=3)
    expected = sinkhorn_knopp(teacher[masks], epsilon=0.05, iterations=3)
    torch.testing.assert_close(targets[masks], expected, rtol=1e-12, atol=1e-12)
    assert torch.all(targets[~masks] == 0)  # unmasked patches take no part
    # the masked patches, not all of them, share the outputs: balanced over the M masked rows
    assert not torch.allclose(targets[masks], sinkhorn_knopp(teacher.flatten(0, 1), 0.05, 3)[masks.flatten()])
    torch.testing.assert_close(targets[masks].sum(dim=1), torch.ones(int(masks.sum()), dtype=torch.float64))


def test_sinkhorn_targets_with_no_masked_patch_are_all_zero():
    teacher, _, _ = random_inputs(seed=19)
    targets = ibot_patch_targets(teacher, 0.05, "sinkhorn_knopp", masked_positions=torch.zeros(0, dtype=torch.long))
    assert targets.shape == teacher.shape and torch.all(targets == 0)


def test_target_arguments_are_checked():
    teacher, _, masks = random_inputs()
    positions = masks.flatten().nonzero().squeeze(1)
    with pytest.raises(ValueError, match=r"teacher patch logits \[C, L, K\]"):
        ibot_patch_targets(teacher[0], 0.04, "none")
    with pytest.raises(ValueError, match="needs masked_positions"):
        ibot_patch_targets(teacher, 0.04, "sinkhorn_knopp")
    with pytest.raises(ValueError, match="takes no masked_positions"):
        ibot_patch_targets(teacher, 0.04, "none", masked_positions=positions)
    with pytest.raises(ValueError, match="needs the running centre"):
        ibot_patch_targets(teacher, 0.04, "centre")
    with pytest.raises(ValueError, match="Unknown centering 'mean'"):
        ibot_patch_targets(teacher, 0.04, "mean")
    with pytest.raises(ValueError, match="temperature > 0"):
        ibot_patch_targets(teacher, 0.0, "sinkhorn_knopp", masked_positions=positions)


# ---------------------------------------------------------------- two ranks

SHARD_SIZES = [3, 5]  # crops per rank
NUM_PATCHES, NUM_OUTPUTS = 4, 6


def global_batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    num_crops = sum(SHARD_SIZES)
    student = torch.randn(num_crops, NUM_PATCHES, NUM_OUTPUTS, generator=generator, dtype=torch.float64) * 2
    teacher = torch.randn(num_crops, NUM_PATCHES, NUM_OUTPUTS, generator=generator, dtype=torch.float64) * 2
    masks = torch.rand(num_crops, NUM_PATCHES, generator=generator) < 0.5
    masks[0, 0] = masks[-1, -1] = True  # masked patches on both ranks
    centre = torch.randn(1, NUM_OUTPUTS, generator=generator, dtype=torch.float64)
    return student, teacher, masks, centre


def ibot_on_one_rank(student, teacher, masks, centre):
    rank = dist.get_rank()
    student, teacher, masks = (t.split(SHARD_SIZES)[rank] for t in (student, teacher, masks))
    student = student.clone().requires_grad_(True)
    targets = ibot_patch_targets(teacher, 0.04, "centre", centre)
    loss = ibot_patch_loss(student, targets, masks, 0.1)
    (grad,) = torch.autograd.grad(loss, student)
    positions = masks.flatten().nonzero().squeeze(1)
    return {
        "centre": dino_centre_update(centre, teacher, 0.9),
        "sinkhorn": ibot_patch_targets(teacher, 0.05, "sinkhorn_knopp", masked_positions=positions),
        "loss": loss.detach(),
        "grad": grad,
    }


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_on_two_ranks(ibot_on_one_rank, tmp_path_factory.mktemp("ibot"), *global_batch())


@pytest.mark.ddp
@pytest.mark.timeout(120)
def test_two_ranks_patch_centre_targets_and_loss_equal_one_process(ranks):
    student, teacher, masks, centre = global_batch()
    # iBOT's center2: m c + (1 - m) times the mean over every teacher patch of the global batch
    patch_mean = sum(teacher[c, p] for c in range(teacher.shape[0]) for p in range(NUM_PATCHES))
    patch_mean = patch_mean / (teacher.shape[0] * NUM_PATCHES)
    for rank in ranks:
        torch.testing.assert_close(rank["centre"], 0.9 * centre + 0.1 * patch_mean.view(1, -1), rtol=1e-12, atol=1e-12)
    # DINOv2's Sinkhorn-Knopp over the masked patches of every rank together
    single = sinkhorn_knopp(teacher[masks], 0.05, 3)
    on_ranks = torch.cat([rank["sinkhorn"][shard_masks] for rank, shard_masks in zip(ranks, masks.split(SHARD_SIZES))])
    torch.testing.assert_close(on_ranks, single, rtol=1e-10, atol=1e-12)
    # the loss of the concatenated batch on every rank, and WORLD_SIZE times its gradient rows (DDP averages)
    loss, grad = value_and_grad(ibot_patch_loss, student, ibot_patch_targets(teacher, 0.04, "centre", centre), masks)
    for rank, (result, grad_rows) in enumerate(zip(ranks, grad.split(SHARD_SIZES))):
        torch.testing.assert_close(result["loss"], loss.detach(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(result["grad"], WORLD_SIZE * grad_rows, rtol=1e-10, atol=1e-12)
