"""ssl_lightning.distributed and the global-batch losses in a real two-process gloo group.

One spawn runs every check on both ranks; the tests compare what each rank returned with a
single-process computation on the concatenated global batch.
"""

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

from ssl_lightning.distributed import (
    all_reduce_mean,
    all_reduce_sum,
    gather,
    rank,
    world_size,
)
from ssl_lightning.losses import (
    barlow_twins,
    batch_info_nce,
    dcl,
    normalized_regression,
    nt_xent,
    self_distillation_loss,
)

from helpers.gloo import WORLD_SIZE, run_on_two_ranks

LOSSES = {
    "nt_xent": nt_xent,
    "barlow_twins": barlow_twins,
    "normalized_regression": normalized_regression,
    "dcl": dcl,
    "batch_info_nce": batch_info_nce,
    "self_distillation_loss": self_distillation_loss,
}
SHARD_SIZES = {"equal": [4, 4], "uneven": [3, 5]}
GATHER_CASES = {
    "equal": ([3, 3], (2,), torch.float64),
    "uneven": ([2, 5], (3, 2), torch.float64),
    "empty_shard": ([0, 4], (3,), torch.float64),
    "int64_uneven": ([4, 1], (), torch.int64),
}
IN_FEATURES, OUT_FEATURES = 5, 4


def close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-12)


def make_inputs() -> dict:
    """Every rank's data, built once by the parent from a fixed seed and sent to both ranks."""
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    gather_inputs = {}
    for name, (sizes, trailing, dtype) in GATHER_CASES.items():
        if dtype.is_floating_point:
            shards = [randn(size, *trailing) for size in sizes]
        else:
            shards = [
                torch.randint(0, 1000, (size, *trailing), generator=generator) for size in sizes
            ]
        upstream = [randn(sum(sizes), *trailing) for _ in sizes]
        gather_inputs[name] = {"shards": shards, "upstream": upstream}
    model = torch.nn.Linear(IN_FEATURES, OUT_FEATURES).double()
    return {
        "gather": gather_inputs,
        "reduce": {
            "shards": [randn(3, 2) for _ in range(WORLD_SIZE)],
            "upstream": [randn(3, 2) for _ in range(WORLD_SIZE)],
        },
        "views": [randn(sum(SHARD_SIZES["equal"]), IN_FEATURES) for _ in range(2)],
        "model": model.state_dict(),
    }


def shard(x, sizes, index):
    start = sum(sizes[:index])
    return x[start : start + sizes[index]]


def linear_model(state) -> torch.nn.Linear:
    model = torch.nn.Linear(IN_FEATURES, OUT_FEATURES).double()
    model.load_state_dict(state)
    return model


def loss_and_parameter_grads(model, loss_fn, view1, view2) -> dict:
    # One forward for both views, as methods do, so DDP sees each parameter used once.
    z1, z2 = model(torch.cat([view1, view2])).split(len(view1))
    loss = loss_fn(z1, z2)
    loss.backward()
    module = model.module if isinstance(model, DistributedDataParallel) else model
    return {"loss": loss.detach(), "weight": module.weight.grad, "bias": module.bias.grad}


def checks_on_one_rank(inputs: dict) -> dict:
    me = rank()
    results = {"rank": me, "world_size": world_size()}

    for name, case in inputs["gather"].items():
        x = case["shards"][me].clone()
        if x.is_floating_point():
            x.requires_grad_(True)
            gathered = gather(x)
            grad_out = case["upstream"][me]
            (results[f"gather/{name}/grad"],) = torch.autograd.grad(gathered, x, grad_out)
        else:
            gathered = gather(x)
        results[f"gather/{name}"] = gathered.detach()

    for name, reduce in {"sum": all_reduce_sum, "mean": all_reduce_mean}.items():
        x = inputs["reduce"]["shards"][me].clone().requires_grad_(True)
        reduced = reduce(x)
        grad_out = inputs["reduce"]["upstream"][me]
        (results[f"{name}/grad"],) = torch.autograd.grad(reduced, x, grad_out)
        results[name] = reduced.detach()

    for loss_name, loss_fn in LOSSES.items():
        for split, sizes in SHARD_SIZES.items():
            model = DistributedDataParallel(linear_model(inputs["model"]))
            views = [shard(view, sizes, me) for view in inputs["views"]]
            for key, value in loss_and_parameter_grads(model, loss_fn, *views).items():
                results[f"{loss_name}/{split}/{key}"] = value
    return results


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    inputs = make_inputs()
    return inputs, run_on_two_ranks(checks_on_one_rank, tmp_path_factory.mktemp("gloo"), inputs)


def test_single_process_fallbacks():
    x = torch.randn(3, 2, requires_grad=True)
    assert (world_size(), rank()) == (1, 0)
    assert gather(x) is x
    assert all_reduce_sum(x) is x
    assert all_reduce_mean(x) is x


def test_gather_rejects_scalars():
    with pytest.raises(ValueError, match="0-d tensor"):
        gather(torch.tensor(1.0))


@pytest.mark.ddp
@pytest.mark.timeout(120)
def test_rank_and_world_size_inside_group(two_rank_results):
    _, results = two_rank_results
    assert [(r["rank"], r["world_size"]) for r in results] == [(0, 2), (1, 2)]


@pytest.mark.ddp
@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", GATHER_CASES)
def test_gather_concatenates_in_rank_order_and_sums_gradients(two_rank_results, case):
    inputs, results = two_rank_results
    shards, upstream = inputs["gather"][case]["shards"], inputs["gather"][case]["upstream"]
    sizes = [len(s) for s in shards]
    for me, result in enumerate(results):
        gathered = result[f"gather/{case}"]
        assert gathered.dtype == shards[0].dtype
        torch.testing.assert_close(gathered, torch.cat(shards), rtol=0, atol=0)
        if gathered.is_floating_point():
            close(result[f"gather/{case}/grad"], shard(sum(upstream), sizes, me))


@pytest.mark.ddp
@pytest.mark.timeout(120)
def test_all_reduce_sum_and_mean_values_and_gradients(two_rank_results):
    inputs, results = two_rank_results
    shards, upstream = inputs["reduce"]["shards"], inputs["reduce"]["upstream"]
    for result in results:
        close(result["sum"], sum(shards))
        close(result["sum/grad"], sum(upstream))
        close(result["mean"], sum(shards) / WORLD_SIZE)
        close(result["mean/grad"], sum(upstream) / WORLD_SIZE)


@pytest.mark.ddp
@pytest.mark.timeout(120)
@pytest.mark.parametrize("split", SHARD_SIZES)
@pytest.mark.parametrize("loss_name", LOSSES)
def test_loss_and_ddp_gradients_equal_single_process_on_global_batch(
    two_rank_results, loss_name, split
):
    inputs, results = two_rank_results
    model = linear_model(inputs["model"])
    expected = loss_and_parameter_grads(model, LOSSES[loss_name], *inputs["views"])
    for result in results:
        for key, value in expected.items():
            close(result[f"{loss_name}/{split}/{key}"], value)
