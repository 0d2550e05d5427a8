"""SIGTERM and Ctrl-C save a checkpoint before the process exits; a rerun resumes from it."""

import os
import re
import signal
import subprocess
import sys
import time

import lightning as L
import pytest
import torch
import yaml

from ssl_lightning.callbacks import SaveOnInterrupt
from ssl_lightning.methods import SimCLR
from ssl_lightning.runs import find_resume_checkpoint, step_checkpoint

from helpers.fakes import TINY_BACKBONE, fake_loader, tiny_fit_args
from helpers.paths import REPO
from helpers.slurm import srun_environment


class Interrupt(L.Callback):
    """Delivers a SIGTERM or raises KeyboardInterrupt at the end of one batch."""

    def __init__(self, batch_idx: int, how: str):
        self.batch_idx, self.how = batch_idx, how

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx != self.batch_idx:
            return
        if self.how == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)  # Lightning's handler only sets a flag
        else:
            raise KeyboardInterrupt


def fit_until_interrupted(tmp_path, how: str) -> L.Trainer:
    model = SimCLR(**TINY_BACKBONE, proj_hidden_dim=32, proj_dim=16, optimizer="adamw", lr=1e-3,
                   in_chans=1, batch_size=8)
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[Interrupt(2, how), SaveOnInterrupt(), step_checkpoint(tmp_path)],
    )
    sigint = signal.getsignal(signal.SIGINT)  # Lightning ignores further Ctrl-C after the first
    try:
        with pytest.raises(SystemExit):
            trainer.fit(model, fake_loader(batch_size=8, length=48))
    finally:
        signal.signal(signal.SIGINT, sigint)
    return trainer


@pytest.mark.parametrize("how", ["sigterm", "keyboard"])
def test_interrupt_saves_a_checkpoint_that_resume_picks(tmp_path, caplog, how):
    caplog.set_level("INFO")
    fit_until_interrupted(tmp_path, how)
    path = tmp_path / "checkpoints" / "interrupted.ckpt"
    assert torch.load(path, weights_only=True)["global_step"] == 3
    reason = "SIGTERM" if how == "sigterm" else "KeyboardInterrupt"
    assert f"{reason}: saved {path} at step 3" in caplog.text
    assert find_resume_checkpoint(tmp_path).path == path


def test_other_errors_save_nothing(tmp_path):
    class Boom(L.Callback):
        def on_train_batch_end(self, *args):
            raise ValueError("boom")

    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, callbacks=[Boom(), SaveOnInterrupt(dirpath=tmp_path)])
    model = SimCLR(**TINY_BACKBONE, proj_hidden_dim=32, proj_dim=16, in_chans=1, batch_size=8, optimizer="adamw")
    with pytest.raises(ValueError, match="boom"):
        trainer.fit(model, fake_loader(batch_size=8))
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sigterm_from_outside_then_rerun_resumes(tmp_path):
    """The CLI as a scheduler sees it: kill the process with SIGTERM mid-run, run the same command again."""
    command = [sys.executable, "-m", "ssl_lightning", *tiny_fit_args("preempted", 1)]
    command[command.index("--trainer.limit_train_batches") + 1] = "40"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    first = subprocess.Popen(command, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    checkpoints = tmp_path / "runs" / "preempted" / "checkpoints"
    # Only the two newest step checkpoints are kept, so step=4.ckpt alone can come and go between polls.
    while max((int(path.stem.removeprefix("step=")) for path in checkpoints.glob("step=*.ckpt")), default=0) < 4:
        assert first.poll() is None, first.stderr.read()
        time.sleep(0.05)
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=60)
    interrupted = torch.load(checkpoints / "interrupted.ckpt", weights_only=True)
    assert 4 <= interrupted["global_step"] < 40, err
    assert f"interrupted.ckpt at step {interrupted['global_step']}; rerun the same command to resume" in err
    assert first.returncode == 0, err  # Lightning's SIGTERMException is a SystemExit without a code

    command[command.index("--trainer.limit_train_batches") + 1] = str(interrupted["global_step"] + 2)
    second = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=90)
    assert second.returncode == 0, second.stderr
    # interrupted.ckpt, or last.ckpt when the step checkpoint fell on the same step (it is saved after)
    assert re.search(rf"Run 'preempted': resuming from runs/preempted/checkpoints/(interrupted|last)\.ckpt "
                     rf"\(step {interrupted['global_step']}, epoch 0\)", second.stdout + second.stderr), second.stderr


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_slurm_requeue_signal_saves_requeues_and_the_requeued_job_resumes(tmp_path):
    """docs/reliability.md's SLURM path, with a one-task job's environment and a stand-in for
    ``scontrol``: SIGUSR1 (``--signal=SIGUSR1@90``) saves hpc_ckpt_1.ckpt and asks for a requeue;
    the SIGTERM that follows saves interrupted.ckpt; the same command (the requeued job) resumes.
    The process signals itself after steps 4 and 5 (tests/kill_switch.py), as SLURM would from outside."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol_calls"}\n')
    scontrol.chmod(0o755)
    signals = tmp_path / "signals.yaml"
    signals.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "helpers.kill_switch.SignalsAtSteps", "init_args": {"signals": {4: "SIGUSR1", 5: "SIGTERM"}}}]}}))
    slurm = srun_environment(task=0, nodes=1)
    env = {**os.environ, **slurm, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    command = [sys.executable, "-m", "ssl_lightning", *tiny_fit_args("requeued", 1)]
    command[command.index("--trainer.limit_train_batches") + 1] = "10"
    first = subprocess.run([*command, "--config", str(signals)], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=90)
    assert first.returncode == 0, first.stderr[-3000:]  # Lightning's SIGTERMException: SystemExit, no code
    assert (tmp_path / "scontrol_calls").read_text().split() == ["requeue", slurm["SLURM_JOB_ID"]]
    run = tmp_path / "runs" / "requeued"
    assert torch.load(run / "hpc_ckpt_1.ckpt", weights_only=True)["global_step"] == 4
    assert torch.load(run / "checkpoints" / "interrupted.ckpt", weights_only=True)["global_step"] == 5

    second = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=90)
    assert second.returncode == 0, second.stderr[-3000:]
    # the newest of the two: interrupted.ckpt, or last.ckpt when the step checkpoint is saved after it
    log = second.stdout + second.stderr
    assert re.search(r"Run 'requeued': resuming from runs/requeued/checkpoints/(interrupted|last)\.ckpt "
                     r"\(step 5, epoch 0\)", log), log[-3000:]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 10
