"""Run directories and finding the checkpoint a rerun resumes from.

A run lives in ``<root>/<run_name>``; its checkpoints sit in ``<root>/<run_name>/checkpoints``
(and Lightning's SLURM requeue checkpoints, ``hpc_ckpt_<n>.ckpt``, in the run directory itself).
A rerun resumes from the newest of them (by modification time) that loads: a file that fails to
load (truncated, corrupt, or missing Lightning's keys) is named in a warning and the next older
one is tried.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn

CHECKPOINT_DIR = "checkpoints"
WANDB_RUN_ID_FILE = "wandb_run_id"
# What Trainer.fit(ckpt_path=...) needs to restore the loops, the model and the optimizers.
REQUIRED_KEYS = ("state_dict", "global_step", "epoch", "loops", "optimizer_states")


def run_dir(root: str | Path, run_name: str) -> Path:
    if not run_name or Path(run_name).name != run_name:
        raise ValueError(f"run_name must be a plain directory name (no '/'), got {run_name!r}")
    return Path(root) / run_name


def checkpoint_dir(run: str | Path) -> Path:
    return Path(run) / CHECKPOINT_DIR


def save_wandb_run_id(run: str | Path, run_id: str) -> None:
    """Remember the W&B run this run logs to (``<run>/wandb_run_id``), for its reruns."""
    Path(run).mkdir(parents=True, exist_ok=True)
    (Path(run) / WANDB_RUN_ID_FILE).write_text(run_id + "\n")


def load_wandb_run_id(run: str | Path) -> str | None:
    path = Path(run) / WANDB_RUN_ID_FILE
    if not path.is_file():
        return None
    return path.read_text().strip() or None


def step_checkpoint(run: str | Path, every_n_train_steps: int | None = None, keep: int = 2) -> ModelCheckpoint:
    """Keeps ``last.ckpt`` and the ``keep`` most recent ``step=N.ckpt`` files of a run.

    ``every_n_train_steps=None`` saves at the end of each training epoch.
    """
    return ModelCheckpoint(
        dirpath=checkpoint_dir(run), filename="{step}", monitor="step", mode="max", save_top_k=keep,
        save_last=True, every_n_train_steps=every_n_train_steps,
    )


@dataclass(frozen=True)
class ResumePoint:
    path: Path
    step: int
    epoch: int


def find_resume_checkpoint(run: str | Path) -> ResumePoint | None:
    """The newest loadable checkpoint of a run, or None when the run has no checkpoint yet.

    Raises when checkpoints exist but none loads, rather than silently starting over.
    """
    directory = checkpoint_dir(run)
    # Lightning's SLURM auto-requeue writes hpc_ckpt_<n>.ckpt into the run directory itself.
    found = [*directory.glob("*.ckpt"), *Path(run).glob("hpc_ckpt_*.ckpt")]
    candidates = sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)
    if not candidates:
        return None
    for path in candidates:
        checkpoint, problem = load_resumable(path)
        if checkpoint is not None:
            return ResumePoint(path, int(checkpoint["global_step"]), int(checkpoint["epoch"]))
        rank_zero_warn(f"Skipping checkpoint {path}: {problem}. Trying the previous one.")
    raise RuntimeError(
        f"None of the {len(candidates)} checkpoints in {directory} loads (see the warnings above). "
        "Pass --ckpt_path to a good checkpoint, or move the directory away to start the run afresh."
    )


def load_resumable(path: Path) -> tuple[dict | None, str | None]:
    """``(checkpoint, None)`` when ``path`` can be resumed from, else ``(None, why not)``."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for truncated or foreign files
        return None, f"it does not load ({type(error).__name__}: {error})"
    if not isinstance(checkpoint, dict):
        return None, f"it holds a {type(checkpoint).__name__}, not a checkpoint dict"
    missing = [key for key in REQUIRED_KEYS if key not in checkpoint]
    if missing:
        return None, f"it lacks the keys {missing}"
    return checkpoint, None
