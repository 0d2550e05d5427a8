"""``AtomicCheckpointIO``: checkpoints that are either complete on disk or absent.

Lightning's ``TorchCheckpointIO`` serialises to memory and then writes the target path in place,
so a job killed during the write leaves a truncated file under the final name. Here the bytes go
to a temporary file in the checkpoint's own directory (same filesystem, so the rename is atomic),
are fsync'ed, and only then replace the target with ``os.replace``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to ``<path>.tmp-<pid>``, fsyncs it and moves it onto ``path``;
    loads with ``weights_only=True`` unless told otherwise.

    Install it with ``Trainer(plugins=[AtomicCheckpointIO()])`` (``SSLCLI`` does so unless the
    config already names a ``CheckpointIO`` plugin). Local filesystems only: remote URLs
    (``s3://``) have no atomic rename; use Lightning's own IO for them.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options; got {storage_options!r}")
        atomic_torch_save(checkpoint, Path(path))

    def load_checkpoint(self, path: _PATH, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        return super().load_checkpoint(path, map_location=map_location, weights_only=True if weights_only is None else weights_only)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary sibling of ``path``, fsync, then ``os.replace`` onto ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable across a power loss; not possible on every OS (Windows).
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
