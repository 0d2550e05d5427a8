"""``RandomStates``: every process's RNG states in each checkpoint, restored when training resumes."""

from __future__ import annotations

import random

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn

CHECKPOINT_KEY = "rng_states"


def capture_rng_states() -> dict:
    """torch (CPU and every initialised CUDA device), numpy and Python states, in types that
    ``torch.load(weights_only=True)`` accepts (tensors, tuples, ints, floats, strings)."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gaussian),
        "python": random.getstate(),
    }


def restore_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    name, keys, position, has_gauss, cached_gaussian = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    random.setstate(states["python"])


class RandomStates(L.Callback):
    """Saves the RNG states of every process in each checkpoint and restores them on resume.

    Randomness inside the model (drop path, masking, noise) draws from the global generators, so a
    resumed run continues exactly only if they are where they were at the checkpoint. The states
    are restored just before the first training batch of the resumed run, after everything that
    runs only on a resume (checkpoint loading, sanity validation, loader start-up). Data order and
    augmentations do not depend on these states (see ``ssl_lightning.datamodules.sampling``).

    Under DDP the states of all ranks are gathered at each regular save; a save from an exception
    handler (Ctrl-C) cannot wait for the other ranks and stores its own rank's states only, which
    then seed every rank on resume (with a warning). The CLI adds this callback to every run.
    """

    def __init__(self) -> None:
        self._pending: dict | None = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        states = capture_rng_states()
        if trainer.world_size > 1 and dist.is_initialized() and not trainer.interrupted:
            per_rank: list = [None] * trainer.world_size
            dist.all_gather_object(per_rank, states)
        else:
            per_rank = [states]
        checkpoint[CHECKPOINT_KEY] = per_rank

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if trainer.state.fn != TrainerFn.FITTING:  # validate / test / predict draw nothing to continue
            return
        per_rank = checkpoint.get(CHECKPOINT_KEY)
        if not per_rank:
            rank_zero_warn("The checkpoint holds no RNG states (written without RandomStates): "
                           "randomness inside the model will not continue exactly.")
            return
        if len(per_rank) != trainer.world_size:
            rank_zero_warn(f"The checkpoint holds RNG states of {len(per_rank)} process(es) but this run has "
                           f"{trainer.world_size}: every rank starts from rank 0's states, so the run does not "
                           "continue exactly.")
        self._pending = per_rank[trainer.global_rank] if len(per_rank) == trainer.world_size else per_rank[0]

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if self._pending is not None:
            restore_rng_states(self._pending)
            self._pending = None
