"""The README's multi-node launches, made CPU-sized: two "nodes" of one process each on this
machine, under ``torchrun`` (``--nnodes 2 --node_rank 0|1``) and under SLURM's ``srun`` (emulated:
each task gets the environment variables srun sets, as docs/scale.md's job script would), each
running the CLI on the quickstart with ``--trainer.num_nodes 2 --trainer.strategy ddp``. The
processes are this test's children, not pytest's, so plain ``ddp`` is safe here (inside pytest's
own process it would re-launch the test session).

Each node runs the CLI's ``main()`` as ``python -m ssl_lightning`` does, then reports what outlived
it: a process group left alive keeps gloo's threads running into the interpreter's shutdown, which
now and then aborted a finished fit (SIGABRT, "terminate called without an active exception").
"""

import csv
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers.paths import CONFIGS
from helpers.slurm import srun_environment

pytestmark = [pytest.mark.ddp, pytest.mark.timeout(300)]

BATCH_SIZE, LR, NODES = 64, 2.0e-3, 2

#: ``python -m ssl_lightning``, then one line on the process group and the threads left after main()
CLI_THEN_REPORT = """
import os, torch.distributed as dist
from ssl_lightning.cli import main
main()
tasks = os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else []
threads = sorted({open(f"/proc/self/task/{task}/comm").read().strip() for task in tasks})
print(f"after main: process group {'alive' if dist.is_initialized() else 'destroyed'}, threads {threads}")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fit_args(root: Path, devices: int = 1) -> list[str]:
    entry = root / "cli_then_report.py"
    if not entry.exists():  # written once: the first node may be reading it already
        entry.write_text(CLI_THEN_REPORT)
    return [
        str(entry), "fit", "--config", str(CONFIGS / "quickstart.yaml"),
        "--trainer.devices", str(devices), "--trainer.num_nodes", str(NODES), "--trainer.strategy", "ddp",
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2",
        "--trainer.enable_progress_bar", "false", "--trainer.callbacks", "[]", "--trainer.log_every_n_steps", "1",
        "--data.batch_size", str(BATCH_SIZE), "--model.init_args.lr", str(LR),
        "--model.init_args.lr_scaling", "linear", "--run_name", "two-nodes", "--root", str(root),
    ]


def torchrun_node(node_rank: int, port: int, root: Path, devices: int = 1) -> tuple[list[str], dict]:
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(NODES), "--nproc_per_node", "1",
               "--node_rank", str(node_rank), "--master_addr", "127.0.0.1", "--master_port", str(port)]
    return command + fit_args(root, devices), {}


def srun_task(node_rank: int, port: int, root: Path, devices: int = 1) -> tuple[list[str], dict]:
    return [sys.executable] + fit_args(root, devices), srun_environment(node_rank, NODES, port)


def launch(launcher, root: Path, devices: int = 1) -> list[tuple[int, str]]:
    """Start both nodes, wait for them; each node's (exit code, output)."""
    port = free_port()
    nodes = []
    for node_rank in range(NODES):
        command, env = launcher(node_rank, port, root, devices)
        nodes.append(subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1", **env},
        ))
    outputs = [node.communicate(timeout=280)[0] for node in nodes]
    return [(node.returncode, output) for node, output in zip(nodes, outputs)]


@pytest.mark.parametrize("launcher", [torchrun_node, srun_task], ids=["torchrun", "srun"])
def test_two_nodes_train_one_run_with_the_lr_of_the_global_batch(launcher, tmp_path):
    results = launch(launcher, tmp_path)
    for node_rank, (returncode, output) in enumerate(results):
        assert returncode == 0, f"node {node_rank} failed:\n{output[-3000:]}"
    outputs = [output for _, output in results]
    if launcher is srun_task:
        assert "SLURM auto-requeueing enabled" in outputs[0]  # Lightning took the job for a SLURM job
    for output in outputs:  # nothing of the process group meets the interpreter's shutdown
        report = next(line for line in output.splitlines() if line.startswith("after main:"))
        assert report.startswith("after main: process group destroyed") and "gloo" not in report, report

    # Rank zero alone reports the optimiser, with the LR scaled by the batch of both nodes.
    reports = [line for output in outputs for line in output.splitlines() if line.startswith("Optimizer adamw")]
    assert len(reports) == 1, reports
    global_batch = BATCH_SIZE * NODES
    assert f"global batch {global_batch} = {BATCH_SIZE} per process x {NODES} process(es)" in reports[0]
    peak = float(re.search(r"peak LR ([0-9.e-]+)", reports[0]).group(1))
    assert peak == pytest.approx(LR * global_batch / 256)

    # One run folder, one logger version (rank zero logs), the LR logged as reported.
    run = tmp_path / "two-nodes"
    assert [path.relative_to(run).as_posix() for path in run.rglob("metrics.csv")] == [
        "lightning_logs/version_0/metrics.csv"
    ]
    with (run / "lightning_logs/version_0/metrics.csv").open() as f:
        logged_lr = [float(row["lr/weights"]) for row in csv.DictReader(f) if row.get("lr/weights")]
    assert logged_lr and max(logged_lr) == pytest.approx(peak)
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 2  # two steps of the global batch
    # rank 0 alone held the run (node 1 was not refused) and released it; no -v1 duplicates
    assert (run / "run.lock").read_text() == ""
    assert not [path.name for path in (run / "checkpoints").iterdir() if "-v" in path.name]


def test_srun_with_devices_other_than_tasks_per_node_stops_naming_both(tmp_path):
    # docs/scale.md: --trainer.devices must equal --ntasks-per-node
    results = launch(srun_task, tmp_path, devices=2)
    for returncode, output in results:
        assert returncode != 0
        assert "devices=2" in output and "--ntasks-per-node=1" in output
