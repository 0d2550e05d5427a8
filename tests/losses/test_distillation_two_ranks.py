"""The distillation losses (KD, DKD, NKD) in a real two-process gloo group: each rank's value equals one
process on the concatenated batch, and its gradient is its rows of the single-process one times the
world size (``ssl_lightning.distributed``'s convention), with uneven shards and a rank without labels.

One spawn computes every loss on both ranks; the tests compare."""

import pytest
import torch
import torch.distributed as dist

from ssl_lightning.losses.dkd import decoupled_kd_terms, dkd_loss
from ssl_lightning.losses.kd import kd_loss
from ssl_lightning.losses.nkd import nkd_loss, nkd_terms

from helpers.gloo import assert_global_batch_value_and_gradients, run_on_two_ranks

SHARD_SIZES = [3, 5]
CLASSES = 6


def kd(student, teacher, labels):  # the KD term needs no label: unlabelled rows count too
    return kd_loss(student, teacher, 4.0)


def tckd(student, teacher, labels):
    return decoupled_kd_terms(student, teacher, labels, 4.0)[0]


def nckd(student, teacher, labels):
    return decoupled_kd_terms(student, teacher, labels, 4.0)[1]


def dkd(student, teacher, labels):
    return dkd_loss(student, teacher, labels)


def nkd_non_target(student, teacher, labels):
    return nkd_terms(student, teacher, labels, 2.0)[1]


def nkd(student, teacher, labels):
    return nkd_loss(student, teacher, labels)


def nkd_target_kept(student, teacher, labels):
    return nkd_loss(student, teacher, labels, keep_target_in_non_target=True)


LOSSES = {fn.__name__: fn for fn in (kd, tckd, nckd, dkd, nkd_non_target, nkd, nkd_target_kept)}


def make_inputs():
    generator = torch.Generator().manual_seed(0)
    students = [2 * torch.randn(size, CLASSES, generator=generator, dtype=torch.float64) for size in SHARD_SIZES]
    teachers = [2 * torch.randn(size, CLASSES, generator=generator, dtype=torch.float64) for size in SHARD_SIZES]
    # Rank 0 has no labelled row: a per-rank mean would weigh rank 1's rows wrongly.
    labels = [torch.full((SHARD_SIZES[0],), -1), torch.tensor([2, -1, 0, 5, 1])]
    return students, teachers, labels


def every_loss_on_one_rank(students, teachers, labels) -> dict:
    rank = dist.get_rank()
    results = {}
    for name, loss_fn in LOSSES.items():
        student = students[rank].clone().requires_grad_(True)
        loss = loss_fn(student, teachers[rank], labels[rank])
        results[name] = {"loss": loss.detach(), "grad": torch.autograd.grad(loss, student)[0]}
    return results


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    inputs = make_inputs()
    return inputs, run_on_two_ranks(every_loss_on_one_rank, tmp_path_factory.mktemp("gloo"), *inputs)


@pytest.mark.ddp
@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", list(LOSSES))
def test_two_ranks_give_the_global_batch_value_and_gradients(name, two_rank_results):
    (students, teachers, labels), results = two_rank_results
    student = torch.cat(students).requires_grad_(True)
    loss = LOSSES[name](student, torch.cat(teachers), torch.cat(labels))
    grad = torch.autograd.grad(loss, student)[0]
    assert loss.abs() > 1e-3  # not a trivially zero case
    assert_global_batch_value_and_gradients([r[name] for r in results], loss.detach(), grad, SHARD_SIZES)
