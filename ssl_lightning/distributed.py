"""Autograd-aware collectives for losses that need the global batch.

Convention (the gather-layer pattern):

* Every rank ends with the same value: the loss computed on the concatenation of all ranks'
  batches in rank order.
* Each collective's backward all-reduces (SUM) the incoming gradient, because every rank's loss
  depends on every rank's inputs. The local input gradients are therefore ``world_size`` times
  the single-process ones, so that after DDP averages the parameter gradients over ranks they
  equal a single-process run on the concatenated global batch.
* Backward runs collectives, so every rank must backpropagate through the same sequence of
  gathers and reductions (as DDP already requires of the forward).

Without an initialised process group every function is the identity and costs nothing.
Only the public ``torch.distributed`` API is used (no ``torch.distributed.nn``).
"""

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["world_size", "rank", "gather", "gather_equal_shards", "all_reduce_sum", "all_reduce_mean"]


def world_size() -> int:
    """Number of processes in the default group; 1 when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def rank() -> int:
    """This process's rank in the default group; 0 when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def _first_dim_sizes(x: Tensor) -> list[int]:
    local = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
    sizes = [torch.empty_like(local) for _ in range(world_size())]
    dist.all_gather(sizes, local)
    return [int(size) for size in sizes]


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        sizes = _first_dim_sizes(x)
        ctx.sizes = sizes
        # all_gather needs equal shapes, so uneven shards are padded to the largest and trimmed.
        padded = x
        if x.shape[0] < max(sizes):
            padded = x.new_zeros((max(sizes), *x.shape[1:]))
            padded[: x.shape[0]] = x
        chunks = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(chunks, padded)
        return torch.cat([chunk[:size] for chunk, size in zip(chunks, sizes)])

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: rank()])
        return grad[start : start + ctx.sizes[rank()]]


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        total = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def gather(x: Tensor) -> Tensor:
    """Concatenate ``x`` from all ranks along dim 0, in rank order.

    Ranks may hold different first-dim sizes (uneven validation shards); the other dims must
    match. Any dtype works; integer tensors simply carry no gradient. Backward all-reduces the
    gradient of the gathered tensor and returns this rank's slice.
    """
    if x.dim() == 0:
        raise ValueError("gather needs a tensor with a batch dimension, got a 0-d tensor")
    if world_size() == 1:
        return x
    return _Gather.apply(x.contiguous())


@torch.no_grad()
def gather_equal_shards(x: Tensor) -> Tensor:
    """Concatenate ``x`` from all ranks along dim 0, in rank order, without autograd.

    Every rank must hold the same shape (training batches with ``drop_last``): unlike
    :func:`gather`, no shard sizes are exchanged, so the host never waits for the device. For
    state that follows the global batch (queues, per-sample memories), not for losses.
    """
    if world_size() == 1:
        return x.detach()
    chunks = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(chunks, x.detach().contiguous())
    return torch.cat(chunks)


def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum of ``x`` over ranks; backward all-reduces (SUM) the incoming gradient."""
    if world_size() == 1:
        return x
    return _AllReduceSum.apply(x)


def all_reduce_mean(x: Tensor) -> Tensor:
    """Mean of ``x`` over ranks; backward all-reduces (SUM) the gradient, divided by world size."""
    if world_size() == 1:
        return x
    return _AllReduceSum.apply(x) / world_size()
