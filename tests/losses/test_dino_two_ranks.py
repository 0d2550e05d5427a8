"""DINO over two gloo ranks with uneven shards (3 and 5 images): the centre update is the formula over
the global batch, the Sinkhorn-Knopp targets are each rank's rows of one process's, and the loss's
value and (after DDP's averaging) gradient equal one process on the concatenated batch. One spawn
for the whole file."""

import pytest
import torch
import torch.distributed as dist

from ssl_lightning.losses.dino import dino_centre_update, dino_loss, dino_teacher_targets

from helpers.gloo import WORLD_SIZE, run_on_two_ranks

pytestmark = [pytest.mark.ddp, pytest.mark.timeout(120)]

SHARD_SIZES = [3, 5]  # images per rank
NUM_GLOBAL, NUM_CROPS, NUM_OUTPUTS = 2, 6, 7


def global_batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    num_images = sum(SHARD_SIZES)
    student = torch.randn(NUM_CROPS, num_images, NUM_OUTPUTS, generator=generator, dtype=torch.float64) * 2
    teacher = torch.randn(NUM_GLOBAL, num_images, NUM_OUTPUTS, generator=generator, dtype=torch.float64) * 2
    centre = torch.randn(1, NUM_OUTPUTS, generator=generator, dtype=torch.float64)
    return student, teacher, centre


def shard(tensor, rank):
    """This rank's images of a [crops, images, outputs] tensor."""
    return tensor.split(SHARD_SIZES, dim=1)[rank]


def dino_on_one_rank(student, teacher, centre):
    rank = dist.get_rank()
    student, teacher = shard(student, rank).clone().requires_grad_(True), shard(teacher, rank)
    targets = dino_teacher_targets(teacher, 0.04, "centre", centre)
    loss = dino_loss(student, targets, 0.1)
    (grad,) = torch.autograd.grad(loss, student)
    return {
        "centre": dino_centre_update(centre, teacher, 0.9),
        "sinkhorn": dino_teacher_targets(teacher, 0.05, "sinkhorn_knopp"),
        "loss": loss.detach(),
        "grad": grad,
    }


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_on_two_ranks(dino_on_one_rank, tmp_path_factory.mktemp("dino"), *global_batch())


def test_the_centre_update_on_two_ranks_is_the_formula_over_the_global_batch(ranks):
    _, teacher, centre = global_batch()
    mean_output = teacher.reshape(-1, NUM_OUTPUTS).sum(dim=0) / teacher.reshape(-1, NUM_OUTPUTS).shape[0]
    expected = 0.9 * centre + 0.1 * mean_output
    for rank in ranks:  # every rank holds the same centre
        torch.testing.assert_close(rank["centre"], expected, rtol=1e-12, atol=1e-12)


def test_sinkhorn_targets_are_each_ranks_rows_of_the_single_process_ones(ranks):
    _, teacher, _ = global_batch()
    single = dino_teacher_targets(teacher, 0.05, "sinkhorn_knopp")
    torch.testing.assert_close(torch.cat([rank["sinkhorn"] for rank in ranks], dim=1), single, rtol=1e-10, atol=1e-12)


def test_loss_value_and_averaged_gradient_equal_one_process(ranks):
    student, teacher, centre = global_batch()
    student = student.clone().requires_grad_(True)
    loss = dino_loss(student, dino_teacher_targets(teacher, 0.04, "centre", centre), 0.1)
    (grad,) = torch.autograd.grad(loss, student)
    for rank, result in enumerate(ranks):
        torch.testing.assert_close(result["loss"], loss.detach(), rtol=1e-10, atol=1e-12)
        # each rank's input gradient is WORLD_SIZE times its rows of one process's: DDP's mean over
        # the ranks then gives the single-process parameter gradients
        torch.testing.assert_close(result["grad"], WORLD_SIZE * shard(grad, rank), rtol=1e-10, atol=1e-12)
