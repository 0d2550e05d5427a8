"""One fit per run at a time (ssl_lightning/run_lock.py): a second fit is refused, a killed fit's
lock is broken as stale, a requeued SLURM job takes its own run back, a launch's other ranks never
lock (the two-node launches in test_multi_node_launch.py share one run directory)."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from ssl_lightning.cli import main
from ssl_lightning.run_lock import LOCK_FILE, RunInUseError, is_launch_rank_zero, lock_run, release_run_locks

from helpers.fakes import tiny_fit_args
from helpers.paths import REPO

ENV = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}", "OMP_NUM_THREADS": "1"}
HOST = socket.gethostname()


@pytest.fixture(autouse=True)
def _release_locks():
    yield
    release_run_locks()  # a failed test must not leave this process holding a run


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "ssl_lightning", *args]


def signals_at(tmp_path: Path, signals: dict[int, str]) -> str:
    """A config adding kill_switch.SignalsAtSteps: the fit signals itself after those steps."""
    config = tmp_path / "signals.yaml"
    config.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "helpers.kill_switch.SignalsAtSteps", "init_args": {"signals": signals}}]}}))
    return str(config)


def holder_record(run: Path) -> dict | None:
    text = (run / LOCK_FILE).read_text().strip()
    return json.loads(text) if text else None


def write_holder_record(run: Path, **fields) -> None:
    """The record a holder that did not end cleanly leaves behind."""
    run.mkdir(parents=True, exist_ok=True)
    holder = {"pid": 1234, "host": HOST, "pid_start": None, "since": "2030-01-01 00:00:00", **fields}
    (run / LOCK_FILE).write_text(json.dumps(holder))


def ended_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait(timeout=60)
    return process.pid


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_second_fit_of_a_running_run_is_refused_naming_its_holder(tmp_path):
    """Fit A stops itself (SIGSTOP) after step 1, holding the run; fit B of the same run exits with
    an error naming the run directory and A; A then finishes alone, with no -v1 file beside its own."""
    first = subprocess.Popen(
        cli(*tiny_fit_args("shared", 1), "--config", signals_at(tmp_path, {1: "SIGSTOP"})),
        cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        _, status = os.waitpid(first.pid, os.WUNTRACED)  # returns once A has stopped itself
        assert os.WIFSTOPPED(status), f"fit A ended before step 1 (status {status}): {first.stderr.read()[-3000:]}"
        second = subprocess.run(cli(*tiny_fit_args("shared", 1)), cwd=tmp_path, env=ENV, capture_output=True,
                                text=True, timeout=120, check=False)
        os.kill(first.pid, signal.SIGCONT)
        _, first_err = first.communicate(timeout=120)
    finally:
        first.kill()
    assert second.returncode != 0, "the second fit ran"
    assert f"RunInUseError: Run directory runs/shared is in use by pid {first.pid} on host {HOST}" in second.stderr, (
        second.stderr[-3000:])
    assert first.returncode == 0, first_err[-3000:]
    checkpoints = tmp_path / "runs" / "shared" / "checkpoints"
    assert sorted(path.name for path in checkpoints.iterdir()) == ["last.ckpt", "step=2.ckpt", "step=3.ckpt"]
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 3
    assert holder_record(tmp_path / "runs" / "shared") is None  # released at exit


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_lock_of_a_killed_fit_is_stale_and_the_rerun_breaks_it_and_resumes(tmp_path, caplog):
    """SIGKILL leaves the holder's record but not its lock, even with the DataLoader workers the
    killed fit forked (they can outlive it by seconds); the rerun warns and resumes."""
    killed = subprocess.Popen(
        cli(*tiny_fit_args("killed", 1, "--data.num_workers", "2"), "--config", signals_at(tmp_path, {2: "SIGKILL"})),
        cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    _, err = killed.communicate(timeout=120)
    assert killed.returncode == -signal.SIGKILL, err[-3000:]
    run = tmp_path / "runs" / "killed"
    assert holder_record(run)["pid"] == killed.pid

    caplog.set_level("INFO")
    with pytest.warns(UserWarning, match=rf"Breaking the stale lock runs/killed/{LOCK_FILE} of pid {killed.pid} "
                                         rf"on host {HOST} \(since .*\): pid {killed.pid} is gone"):
        rerun = main(tiny_fit_args("killed", 1))
    # killed after step 2, before its checkpoint (ModelCheckpoint saves after the other callbacks)
    assert "Run 'killed': resuming from runs/killed/checkpoints/last.ckpt (step 1, epoch 0)" in caplog.text
    assert rerun.trainer.global_step == 3
    assert holder_record(run) is None


def test_requeued_slurm_job_takes_back_the_run_of_its_previous_incarnation(tmp_path, monkeypatch, caplog):
    """The job's first incarnation held the run on another node and died there without a clean exit;
    SLURM requeued it (same SLURM_JOB_ID, SLURM_RESTART_COUNT 1): it must resume, not be refused."""
    main(tiny_fit_args("requeued", 1))
    write_holder_record(Path("runs/requeued"), host="node-lost", slurm_job_id="4242", slurm_restart_count=0)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    caplog.set_level("INFO")
    with pytest.warns(UserWarning, match="of pid 1234 on host node-lost .*: SLURM job 4242 was requeued"):
        again = main(tiny_fit_args("requeued", 2))
    assert "Run 'requeued': resuming from runs/requeued/checkpoints/last.ckpt (step 3, epoch 0)" in caplog.text
    assert again.trainer.global_step == 6


def test_holder_on_another_host_is_refused_with_how_to_break_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4243")  # another job: not a requeue of the holder's
    write_holder_record(tmp_path / "run", host="node-7", slurm_job_id="4242")
    with pytest.raises(RunInUseError) as refused:
        lock_run(tmp_path / "run")
    message = str(refused.value)
    assert f"Run directory {tmp_path / 'run'} is held by pid 1234 on host node-7 (since 2030-01-01 00:00:00, " \
           f"SLURM job 4242)" in message
    assert f"cannot be checked from host {HOST}" in message and f"delete {tmp_path / 'run' / LOCK_FILE}" in message
    assert holder_record(tmp_path / "run")["host"] == "node-7"  # left as it was


@pytest.mark.parametrize("why", ["pid gone", "pid reused"])
def test_holder_on_this_host_that_no_longer_runs_is_stale(tmp_path, why):
    if why == "pid gone":
        write_holder_record(tmp_path / "run", pid=ended_pid())
        reason = "is gone"
    else:
        if not Path("/proc/self/stat").exists():
            pytest.skip("needs /proc to read a process's start time")
        write_holder_record(tmp_path / "run", pid=os.getpid(), pid_start=1)  # this pid, another start time
        reason = "now belongs to another process"
    with pytest.warns(UserWarning, match=f"Breaking the stale lock .*{reason}"):
        lock_run(tmp_path / "run")
    assert holder_record(tmp_path / "run")["pid"] == os.getpid()


@pytest.mark.parametrize(("environment", "locks"), [
    ({}, True),  # one process, or the main process of ddp_spawn
    ({"RANK": "0", "LOCAL_RANK": "0", "GROUP_RANK": "0"}, True),  # torchrun, first node
    ({"RANK": "1", "LOCAL_RANK": "0", "GROUP_RANK": "1"}, False),  # torchrun, second node
    ({"SLURM_PROCID": "0"}, True), ({"SLURM_PROCID": "3"}, False),  # srun
    ({"NODE_RANK": "1"}, False),  # Lightning's ddp launcher, second node's main process
    ({"LOCAL_RANK": "1"}, False),  # Lightning's ddp launcher, a child process
])
def test_only_global_rank_zero_of_a_launch_takes_the_lock(environment, locks):
    assert is_launch_rank_zero(environment) is locks
