"""Counting the tensor operations that make the host wait for an accelerator, on any device.

On a GPU these operations either copy a value to the host (``.item()``, ``bool()``, ``int()``) or
size their output by the data (``nonzero``, selecting by a boolean mask, ``unique``), so the CPU
stops until the GPU has finished everything queued before them. On the CPU they cost nothing, so
tests here count them by name: the same Python code dispatches the same operations on any device.
"""

from __future__ import annotations

import collections
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNCING_OPS = {
    "aten._local_scalar_dense.default",  # .item(), bool(), int(), float()
    "aten.is_nonzero.default",
    "aten.nonzero.default",
    "aten.masked_select.default",
    "aten.equal.default",
    "aten.bincount.default",
    "aten.repeat_interleave.Tensor",
    "aten.unique_consecutive.default",
    "aten.unique_dim.default",
    "aten._unique.default",
    "aten._unique2.default",
}
INDEXING_OPS = ("aten.index.Tensor", "aten.index_put.default", "aten.index_put_.default")


def selects_by_mask(name: str, args: tuple) -> bool:
    """Indexing with a boolean mask: the result's size is the mask's count, read on the host."""
    if name not in INDEXING_OPS:
        return False
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


class HostSyncCounter(TorchDispatchMode):
    """Records every syncing operation while ``counting`` is True, with the Python line that ran it."""

    def __init__(self) -> None:
        super().__init__()
        self.counting = False
        self.seen: collections.Counter[tuple[str, str]] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if self.counting and (name in SYNCING_OPS or selects_by_mask(name, args)) and not reads_optimizer_step(name):
            self.seen[(name, caller())] += 1
        return func(*args, **(kwargs or {}))

    def total(self) -> int:
        return sum(self.seen.values())


def reads_optimizer_step(name: str) -> bool:
    """torch's optimizers read their step counters with ``.item()``, but keep them in host memory
    unless ``capturable`` or ``fused`` is set: no wait on a GPU either."""
    if name != "aten._local_scalar_dense.default":
        return False
    wrappers = ("/torch/_dynamo/", "/torch/_compile.py", "/torch/utils/_python_dispatch.py", "/torch/_ops.py")
    frames = reversed(traceback.extract_stack()[:-2])
    innermost = next((f.filename for f in frames if not any(w in f.filename for w in wrappers)), "")
    return "/torch/optim/" in innermost


def caller() -> str:
    """The innermost frame outside torch itself: the line that asked for the operation."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "/torch/" not in frame.filename and not frame.filename.endswith("host_syncs.py"):
            folder, name = frame.filename.rsplit("/", 2)[-2:]
            return f"{folder}/{name}:{frame.lineno} {frame.line}"
    return "?"
