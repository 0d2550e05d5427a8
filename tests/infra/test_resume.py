"""Runs in <root>/<run_name>, automatic resume from the loadable checkpoint with the highest step."""

import os
import shutil
from pathlib import Path

import pytest
import torch

from ssl_lightning.cli import main
from ssl_lightning.runs import find_resume_checkpoint, run_dir

from helpers.fakes import tiny_fit_args


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """One epoch of 3 steps in <tmp>/runs/base: step=2, step=3 and last.ckpt remain."""
    root = tmp_path_factory.mktemp("runs")
    main(tiny_fit_args("base", 1, "--root", str(root)))
    return root / "base"


def copy_run(run: Path, name: str) -> Path:
    target = Path("runs") / name
    shutil.copytree(run, target)
    return target


def test_run_lives_in_root_and_keeps_last_two_step_checkpoints(finished_run):
    names = sorted(path.name for path in (finished_run / "checkpoints").iterdir())
    assert names == ["last.ckpt", "step=2.ckpt", "step=3.ckpt"]  # step=1 was removed, no temp files left
    assert (finished_run / "lightning_logs").is_dir()


def test_a_fit_whose_length_is_not_a_multiple_of_the_checkpoint_interval_saves_its_final_step(tmp_path):
    main(tiny_fit_args("uneven", 1, "--root", str(tmp_path), "--checkpoint_every_n_steps", "2"))
    checkpoints = tmp_path / "uneven" / "checkpoints"
    assert sorted(path.name for path in checkpoints.iterdir()) == ["last.ckpt", "step=2.ckpt", "step=3.ckpt"]
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 3


def test_rerun_with_same_name_resumes_from_last_checkpoint(finished_run, caplog):
    copy_run(finished_run, "again")
    caplog.set_level("INFO")
    cli = main(tiny_fit_args("again", 2))
    assert "Run 'again': resuming from runs/again/checkpoints/last.ckpt (step 3, epoch 0)" in caplog.text
    assert cli.trainer.global_step == 6  # three more steps, not six
    assert cli.trainer.default_root_dir == os.path.join("runs", "again")


def test_explicit_ckpt_path_wins(finished_run, caplog):
    copy_run(finished_run, "explicit")
    caplog.set_level("INFO")
    cli = main(tiny_fit_args("explicit", 1, "--ckpt_path", "runs/explicit/checkpoints/step=2.ckpt"))
    assert "resuming from" not in caplog.text
    assert cli.trainer.global_step == 3


def test_corrupt_newest_checkpoint_is_named_and_the_previous_one_used(finished_run):
    run = copy_run(finished_run, "corrupt")
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])  # a truncated write
    no_loops = run / "checkpoints" / "step=3.ckpt"
    checkpoint = torch.load(no_loops, weights_only=True)
    del checkpoint["loops"]
    torch.save(checkpoint, no_loops)
    os.utime(no_loops, (last.stat().st_mtime - 1,) * 2)
    os.utime(run / "checkpoints" / "step=2.ckpt", (last.stat().st_mtime - 2,) * 2)
    with pytest.warns(UserWarning) as warnings:
        point = find_resume_checkpoint(run)
    messages = " ".join(str(w.message) for w in warnings)
    assert "last.ckpt: it does not load" in messages
    assert "step=3.ckpt: it lacks the keys ['loops']" in messages
    assert point.path.name == "step=2.ckpt" and point.step == 2
    assert [note.split(" (")[0] for note in point.passed_over] == [str(last), str(no_loops)]


def test_no_loadable_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "last.ckpt").write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match="last.ckpt"), pytest.raises(RuntimeError, match="None of the 1 checkpoints"):
        find_resume_checkpoint(tmp_path / "run")


def test_new_run_has_nothing_to_resume(tmp_path):
    assert find_resume_checkpoint(tmp_path / "fresh") is None


def test_run_name_must_be_a_plain_name():
    with pytest.raises(ValueError, match="plain directory name"):
        run_dir("runs", "a/b")


def test_step_checkpoints_need_a_run_name():
    args = [arg for arg in tiny_fit_args("x", 1) if arg not in ("--run_name", "x")]
    with pytest.raises(ValueError, match="checkpoint_every_n_steps needs run_name"):
        main(args)


def test_slurm_requeue_checkpoint_counts(finished_run):
    run = copy_run(finished_run, "slurm")
    hpc = run / "hpc_ckpt_1.ckpt"
    shutil.copy(run / "checkpoints" / "last.ckpt", hpc)  # step 3, as last.ckpt, written after it
    os.utime(hpc, ((run / "checkpoints" / "last.ckpt").stat().st_mtime + 1,) * 2)
    assert find_resume_checkpoint(run).path == hpc


def test_resume_takes_the_highest_step_not_the_newest_file(finished_run, caplog):
    """A run's old interrupted.ckpt (here step 2), touched after last.ckpt (step 3), must not send
    a rerun back in time; the resume line names the file it passed over and why."""
    run = copy_run(finished_run, "back-in-time")
    old = run / "checkpoints" / "interrupted.ckpt"
    shutil.copy(run / "checkpoints" / "step=2.ckpt", old)
    os.utime(old, ((run / "checkpoints" / "last.ckpt").stat().st_mtime + 60,) * 2)
    caplog.set_level("INFO")
    cli = main(tiny_fit_args("back-in-time", 2))
    assert ("Run 'back-in-time': resuming from runs/back-in-time/checkpoints/last.ckpt (step 3, epoch 0). "
            "Passed over: runs/back-in-time/checkpoints/interrupted.ckpt (step 2: an earlier step, written later)."
            ) in caplog.text
    assert cli.trainer.global_step == 6


def test_equal_steps_go_to_the_newest_file(finished_run):
    run = copy_run(finished_run, "tie")
    step_3 = run / "checkpoints" / "step=3.ckpt"  # the same step as last.ckpt
    os.utime(step_3, ((run / "checkpoints" / "last.ckpt").stat().st_mtime + 1,) * 2)
    assert find_resume_checkpoint(run).path == step_3


def test_resuming_an_earlier_step_overwrites_instead_of_adding_version_suffixes(finished_run):
    """Lightning's ModelCheckpoint would write step=3-v1.ckpt and last-v1.ckpt next to the files of
    the abandoned steps (a moved run directory or --ckpt_path to an earlier step)."""
    run = copy_run(finished_run, "rewind")
    main(tiny_fit_args("rewind", 1, "--ckpt_path", "runs/rewind/checkpoints/step=2.ckpt"))
    names = sorted(path.name for path in (run / "checkpoints").iterdir())
    assert not [name for name in names if "-v" in name], names
    assert "last.ckpt" in names
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3


@pytest.mark.timeout(180)
def test_rerun_continues_the_same_wandb_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    wandb = ("--trainer.logger", "ssl_lightning.loggers.SafeWandbLogger", "--trainer.logger.offline", "true",
             "--trainer.logger.save_dir", str(tmp_path))
    first = main(tiny_fit_args("logged", 1, *wandb))
    first_id = first.trainer.logger.experiment.id
    first.trainer.logger.experiment.finish()
    assert (Path("runs") / "logged" / "wandb_run_id").read_text().strip() == first_id
    again = main(tiny_fit_args("logged", 2, *wandb))
    try:
        assert again.trainer.global_step == 6  # resumed
        assert again.trainer.logger.experiment.id == first_id
    finally:
        again.trainer.logger.experiment.finish()
