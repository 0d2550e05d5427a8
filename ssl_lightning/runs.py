"""Run directories and finding the checkpoint a rerun resumes from.

A run lives in ``<root>/<run_name>``; its checkpoints sit in ``<root>/<run_name>/checkpoints``
(and Lightning's SLURM requeue checkpoints, ``hpc_ckpt_<n>.ckpt``, in the run directory itself).
A rerun resumes from the one with the highest ``global_step`` that loads, the newest file among
equal steps: modification times alone would send a run back in time whenever an old file (an
``interrupted.ckpt`` of an earlier launch) is touched after ``last.ckpt``. A file that fails to load
(truncated, corrupt, or missing Lightning's keys) is named in a warning and passed over.
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

    ``every_n_train_steps=None`` saves at the end of each training epoch. A name that exists is
    overwritten (atomically, by ``AtomicCheckpointIO``): it is the same step of the same run, written
    again after a resume from an earlier step or in a moved run directory, where Lightning's
    version counter would add ``step=N-v1.ckpt`` and ``last-v1.ckpt`` beside the abandoned files.
    """
    return StepCheckpoint(
        dirpath=checkpoint_dir(run), filename="{step}", monitor="step", mode="max", save_top_k=keep,
        save_last=True, every_n_train_steps=every_n_train_steps, enable_version_counter=False,
    )


class StepCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` that also saves the final step of a fit.

    With ``every_n_train_steps`` Lightning saves only at multiples of it (and, having saved a
    ``last.ckpt`` once, not again at the end), so a fit whose length is not a multiple would leave
    ``last.ckpt`` behind its final weights: a finished run would be resumed, evaluated, exported or
    used as a teacher a few steps short. Here the end of a fit saves the step checkpoint and
    ``last.ckpt`` unless the final step is saved already. A fit stopped by an exception does not
    come here (preemption saves through ``SaveOnInterrupt``).
    """

    def on_train_end(self, trainer, pl_module) -> None:
        if not self._should_skip_saving_checkpoint(trainer):
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
        super().on_train_end(trainer, pl_module)


@dataclass(frozen=True)
class ResumePoint:
    path: Path
    step: int
    epoch: int
    #: "<path> (why)" for each checkpoint written after ``path`` or not loadable, newest first
    passed_over: tuple[str, ...] = ()


def find_resume_checkpoint(run: str | Path) -> ResumePoint | None:
    """The loadable checkpoint of a run with the highest step (the newest file among equal steps),
    or None when the run has no checkpoint yet.

    Raises when checkpoints exist but none loads, rather than silently starting over.
    """
    directory = checkpoint_dir(run)
    # Lightning's SLURM auto-requeue writes hpc_ckpt_<n>.ckpt into the run directory itself.
    found = [*directory.glob("*.ckpt"), *Path(run).glob("hpc_ckpt_*.ckpt")]
    if not found:
        return None
    mtimes = {path: path.stat().st_mtime for path in found}
    newest_first = sorted(found, key=mtimes.get, reverse=True)
    points, passed_over = [], {}
    for path in newest_first:
        checkpoint, problem = load_resumable(path)
        if checkpoint is None:
            rank_zero_warn(f"Skipping checkpoint {path}: {problem}.")
            passed_over[path] = problem
        else:
            points.append(ResumePoint(path, int(checkpoint["global_step"]), int(checkpoint["epoch"])))
    if not points:
        raise RuntimeError(
            f"None of the {len(found)} checkpoints in {directory} loads (see the warnings above). "
            "Pass --ckpt_path to a good checkpoint, or move the directory away to start the run afresh."
        )
    chosen = max(points, key=lambda point: (point.step, mtimes[point.path]))
    for point in points:
        if mtimes[point.path] > mtimes[chosen.path]:
            passed_over[point.path] = f"step {point.step}: an earlier step, written later"
    notes = tuple(f"{path} ({passed_over[path]})" for path in newest_first if path in passed_over)
    return ResumePoint(chosen.path, chosen.step, chosen.epoch, notes)


def load_resumable(path: Path) -> tuple[dict | None, str | None]:
    """``(checkpoint, None)`` when ``path`` can be resumed from, else ``(None, why not)``."""
    try:
        # mmap: tensors stay on disk, so reading the step of every candidate costs no memory
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # torch raises many types for truncated or foreign files
        return None, f"it does not load ({type(error).__name__}: {error})"
    if not isinstance(checkpoint, dict):
        return None, f"it holds a {type(checkpoint).__name__}, not a checkpoint dict"
    missing = [key for key in REQUIRED_KEYS if key not in checkpoint]
    if missing:
        return None, f"it lacks the keys {missing}"
    return checkpoint, None
