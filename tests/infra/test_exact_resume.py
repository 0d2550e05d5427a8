"""A run killed with SIGKILL mid-epoch and rerun ends bit-identical to an uninterrupted run.

The runs are real CLI processes with two DataLoader workers. The backbone uses drop path, so the
model draws from the global RNG every step: the test fails if the RNG states, the data order or
the per-sample augmentation seeds are not restored exactly. One method per family, each on one of
the two view paths: MoCoV2 with views drawn on the device (its key queue and EMA key encoder must
come back bit for bit too), and Classifier with views per image in the workers and Mixup / CutMix,
which draws from numpy's global RNG every step.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers.fakes import TINY_BACKBONE
from helpers.paths import TESTS

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

STEPS_PER_EPOCH = 22  # 1,437 training digits // 64
CHECKPOINT_EVERY = 4
KILL_AT = 15  # three steps after the mid-epoch checkpoint at step 12


MODELS = {
    "MoCoV2": {"proj_hidden_dim": 32, "proj_dim": 16, "queue_size": 128},  # 2 global batches of 64
    "Classifier": {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "label_smoothing": 0.1},
}
VIEWS = {"MoCoV2": "simclr", "Classifier": "supervised"}


def recipe(method: str, view_device: str) -> dict:
    return {
        "seed_everything": 0,
        "checkpoint_every_n_steps": CHECKPOINT_EVERY,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_epochs": 2, "limit_val_batches": 0, "logger": False,
            "enable_progress_bar": False, "enable_model_summary": False,
        },
        "model": {"class_path": method, "init_args": {
            "backbone": TINY_BACKBONE["backbone"], "cifar_stem": True,
            "backbone_kwargs": {**TINY_BACKBONE["backbone_kwargs"], "drop_path_rate": 0.2},
            "optimizer": "adamw", "lr": 1e-3, **MODELS[method],
        }},
        "data": {"class_path": "Digits", "init_args": {
            "batch_size": 64, "num_workers": 2, "persistent_workers": True, "view_device": view_device,
            "views": VIEWS[method],
        }},
    }


def start_fit(config: Path, run_name: str, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "ssl_lightning", "fit", "--config", str(config), "--run_name", run_name, *extra],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def finish(process: subprocess.Popen) -> subprocess.CompletedProcess:
    try:
        stdout, stderr = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def fit(config: Path, run_name: str, *extra: str) -> subprocess.CompletedProcess:
    return finish(start_fit(config, run_name, *extra))


def final_state(run_name: str) -> dict:
    return torch.load(Path("runs") / run_name / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


@pytest.mark.parametrize("method,view_device", [("MoCoV2", "device"), ("Classifier", "cpu")])
def test_sigkill_mid_epoch_then_rerun_equals_uninterrupted_run(tmp_path, method, view_device):
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump(recipe(method, view_device)))
    kill = tmp_path / "kill.yaml"
    kill.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "helpers.kill_switch.SignalsAtSteps", "init_args": {"signals": {KILL_AT: "SIGKILL"}}}]}}))

    # The uninterrupted run shares nothing with the other two: it runs beside them (most of a short
    # fit is start-up, which overlaps well on two cores).
    uninterrupted = start_fit(config, "straight")
    try:
        killed = fit(config, "killed", "--config", str(kill))
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
        resumed = fit(config, "killed")
    finally:
        straight = finish(uninterrupted)
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stdout + resumed.stderr
    assert f"Run 'killed': resuming from runs/killed/checkpoints/last.ckpt (step {3 * CHECKPOINT_EVERY}, epoch 0)" in log
    assert "not resumable" not in log

    expected, got = final_state("straight"), final_state("killed")
    assert got["global_step"] == expected["global_step"] == 2 * STEPS_PER_EPOCH
    assert expected["state_dict"].keys() == got["state_dict"].keys()
    for name, tensor in expected["state_dict"].items():  # the queue and the key encoder included
        assert torch.equal(tensor, got["state_dict"][name]), name
    for key, moments in expected["optimizer_states"][0]["state"].items():
        for name, value in moments.items():
            assert torch.equal(value, got["optimizer_states"][0]["state"][key][name]), (key, name)
