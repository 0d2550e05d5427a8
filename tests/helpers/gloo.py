"""Run a function on every rank of a two-process gloo group on the CPU, for distributed tests.

Processes are started with ``torch.multiprocessing.spawn`` (never Lightning's plain ``ddp``,
which would re-launch the whole pytest session), rendezvous through a FileStore in a test's
temporary directory (no port to race for), and hand results back through files there.
"""

import datetime
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD_SIZE = 2


def run_on_two_ranks(worker, directory: Path, *args) -> list:
    """Call ``worker(*args)`` on ranks 0 and 1 of a gloo group; return each rank's result.

    ``worker`` must be a module-level function (it is pickled by name) that returns tensors,
    numbers or containers of them.
    """
    mp.spawn(_run_rank, args=(worker, str(directory), args), nprocs=WORLD_SIZE, join=True)
    return [
        torch.load(_result_path(directory, rank), weights_only=True) for rank in range(WORLD_SIZE)
    ]


def _result_path(directory, rank: int) -> Path:
    return Path(directory) / f"rank{rank}.pt"


def _run_rank(rank: int, worker, directory: str, args: tuple) -> None:
    # Two ranks share the machine's cores; more threads each would only oversubscribe them.
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{Path(directory) / 'store'}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        torch.save(worker(*args), _result_path(directory, rank))
    finally:
        dist.destroy_process_group()
    # A DistributedDataParallel wrapper keeps the gloo group (and its threads) alive past
    # destroy_process_group; tearing those threads down during interpreter shutdown aborts the
    # process now and then (SIGABRT, after the results are written). Skip that shutdown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def loss_on_one_rank(loss_fn, shards: list[tuple], *extra) -> dict:
    """A worker for ``run_on_two_ranks``: ``loss_fn(first, *rest, *extra)`` on this rank's shard
    ``(first, *rest)``, and its gradient with respect to ``first``."""
    first, *rest = shards[dist.get_rank()]
    first = first.clone().requires_grad_(True)
    loss = loss_fn(first, *rest, *extra)
    (grad,) = torch.autograd.grad(loss, first)
    return {"loss": loss.detach(), "grad": grad}


def assert_global_batch_value_and_gradients(results: list[dict], loss, grad, shard_sizes: list[int]) -> None:
    """Every rank's loss equals the single-process ``loss`` on the concatenated batch, and its input
    gradient is WORLD_SIZE times its rows of the single-process ``grad``, so that DDP's averaging of
    the parameter gradients gives the single-process result (``ssl_lightning.distributed``)."""
    start = 0
    for result, size in zip(results, shard_sizes):
        torch.testing.assert_close(result["loss"], loss, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(result["grad"], WORLD_SIZE * grad[start : start + size], rtol=1e-10, atol=1e-12)
        start += size
