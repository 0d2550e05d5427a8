"""GuidedSelfDistillation (Borup and Andersen 2021) and its multi-round driver: round 0 without a teacher is
plain training on the labels (Classifier's cross-entropy with that objective), with a teacher the targets mix
by alpha; the driver's errors, and a driver killed with SIGKILL while round 1 trains resumes at round 1 from
its checkpoint, leaves round 0 untouched and chains each round's final checkpoint into the next as teacher."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from ssl_lightning.methods.supervised.classifier import Classifier
from ssl_lightning.methods.supervised.guided_self_distillation import GuidedSelfDistillation
from ssl_lightning.methods.supervised.rounds import main as rounds_main

from helpers.fakes import TINY_BACKBONE, fake_loader, quick_trainer
from helpers.paths import CONFIGS, REPO, TESTS

CLASSES = 4


def built(cls, **kwargs):
    model = cls(**TINY_BACKBONE, in_chans=1, num_classes=CLASSES, batch_size=8, **kwargs)
    model.configure_model()
    return model


def batch(labels=None):
    data = next(iter(fake_loader(size=16, num_views=1, num_classes=CLASSES)))
    return data if labels is None else {**data, "label": torch.tensor(labels)}


def loss_and_head_gradient(model, data):
    model.zero_grad()
    out = model.shared_step(data)
    out["loss"].backward()
    return out, model.head.weight.grad.clone()


class FixedTeacher(nn.Module):
    """Logits that depend on the image (its mean) and the class, known to the test."""

    num_classes = CLASSES

    def forward(self, images):
        return images.mean(dim=(1, 2, 3))[:, None] * torch.arange(1.0, CLASSES + 1) + torch.arange(CLASSES) * 0.3


# ----------------------------------------------------------------- the method
def test_round_zero_without_a_teacher_is_the_classifiers_cross_entropy():
    torch.manual_seed(0)
    classifier = built(Classifier)
    student = built(GuidedSelfDistillation, objective="cross_entropy", alpha=0.3)
    student.load_state_dict(classifier.state_dict())
    assert student.teacher is None
    data = batch([0, 1, -1, 3, 2, 2, -1, 1])
    expected, expected_grad = loss_and_head_gradient(classifier, data)
    out, grad = loss_and_head_gradient(student, data)
    torch.testing.assert_close(out["loss"], expected["loss"], rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-8)
    assert set(out) == {"loss", "loss/labels", "feats", "logits"}  # no teacher term to log


def test_round_zero_with_the_papers_squared_error_fits_the_one_hot_labels():
    torch.manual_seed(0)
    student = built(GuidedSelfDistillation)  # objective "mse", the paper's
    labels = [0, 1, -1, 3, 2, 2, -1, 1]
    out = student.shared_step(batch(labels))
    labelled = torch.tensor(labels) >= 0
    probs = out["logits"][labelled].float().softmax(1)
    expected = F.mse_loss(probs, F.one_hot(torch.tensor(labels)[labelled], CLASSES).float())
    torch.testing.assert_close(out["loss"], expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("objective", ["mse", "cross_entropy"])
def test_with_a_teacher_alpha_weighs_the_labels_and_one_minus_alpha_the_teachers_predictions(objective):
    torch.manual_seed(0)
    data = batch([0, 1, 3, 3, 2, 2, 0, 1])
    student = built(GuidedSelfDistillation, objective=objective, alpha=0.7, teacher=FixedTeacher())
    out = student.shared_step(data)
    p = out["logits"].detach().float().softmax(1)
    q = FixedTeacher()(data["views"][0]).softmax(1)
    y = F.one_hot(data["label"], CLASSES).float()
    if objective == "mse":
        labels_term, teacher_term = (p - y).square().mean(), (p - q).square().mean()
    else:
        labels_term, teacher_term = -(y * p.log()).sum(1).mean(), -(q * p.log()).sum(1).mean()
    torch.testing.assert_close(out["loss/labels"], labels_term, rtol=1e-5, atol=0)
    torch.testing.assert_close(out["loss/teacher"], teacher_term, rtol=1e-5, atol=0)
    torch.testing.assert_close(out["loss"], 0.7 * labels_term + 0.3 * teacher_term, rtol=1e-5, atol=0)
    assert abs(labels_term - teacher_term) > 1e-3  # the two targets differ, so the weights matter


def test_alpha_one_with_a_teacher_is_round_zero_and_alpha_zero_ignores_the_labels():
    torch.manual_seed(0)
    round_zero = built(GuidedSelfDistillation)
    data = batch([0, 1, 3, 3, 2, 2, 0, 1])
    relabelled = {**data, "label": torch.tensor([3, 3, 0, 1, 1, 0, 2, 2])}
    for alpha, same in ((1.0, True), (0.0, False)):
        student = built(GuidedSelfDistillation, alpha=alpha, teacher=FixedTeacher())
        student.backbone.load_state_dict(round_zero.backbone.state_dict())
        student.head.load_state_dict(round_zero.head.state_dict())
        loss = student.shared_step(data)["loss"]
        if same:
            assert loss.item() == round_zero.shared_step(data)["loss"].item()
        else:
            assert loss.item() == student.shared_step(relabelled)["loss"].item()


def test_a_distilled_checkpoint_evaluates_without_its_teacher_but_does_not_resume_without_it(tmp_path):
    torch.manual_seed(0)
    distilled = built(GuidedSelfDistillation, teacher=FixedTeacher(), optimizer="adamw", lr=1e-3)
    trainer = quick_trainer(max_steps=1)
    trainer.fit(distilled, fake_loader(size=16, num_views=1, num_classes=CLASSES))
    path = tmp_path / "round_1.ckpt"
    trainer.save_checkpoint(path)
    restored = GuidedSelfDistillation.load_from_checkpoint(path, weights_only=True)  # no teacher in hparams
    assert not restored.teacher.loaded  # the fingerprint only: evaluation needs no teacher
    x = torch.randn(2, 1, 16, 16)
    torch.testing.assert_close(restored.eval()(x), distilled.eval()(x))
    with pytest.raises(ValueError, match="trained with a teacher, and no teacher was given"):
        quick_trainer(max_steps=2).fit(built(GuidedSelfDistillation, optimizer="adamw", lr=1e-3),
                                       fake_loader(size=16, num_views=1, num_classes=CLASSES), ckpt_path=path)
    round_zero = tmp_path / "round_0.ckpt"
    untaught = {key: value for key, value in restored.state_dict().items() if not key.startswith("teacher.")}
    torch.save({**torch.load(path, weights_only=True), "state_dict": untaught}, round_zero)
    with pytest.raises(ValueError, match=r"trained without a teacher \(round 0\), but a teacher"):
        GuidedSelfDistillation.load_from_checkpoint(round_zero, weights_only=True, teacher=FixedTeacher())


@pytest.mark.parametrize("kwargs, match", [
    (dict(alpha=1.2), r"alpha .* \[0, 1\], got 1.2"),
    (dict(objective="kl"), "objective must be 'mse' or 'cross_entropy'"),
    (dict(teacher_head="head.safetensors"), "teacher_head given without a teacher"),
    (dict(save_teacher=True), "save_teacher given without a teacher"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GuidedSelfDistillation(**TINY_BACKBONE, **kwargs)


# ----------------------------------------------------------------- the driver: errors
def tiny_recipe(folder: Path, **model_args) -> Path:
    """Three steps per round on Digits with the tiny ResNet; a one-batch test."""
    recipe = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 1, "limit_train_batches": 3,
                    "limit_val_batches": 0, "limit_test_batches": 1, "logger": False, "enable_progress_bar": False,
                    "enable_model_summary": False},
        "model": {"class_path": "GuidedSelfDistillation", "init_args": {
            "alpha": 0.6, "backbone": TINY_BACKBONE["backbone"], "cifar_stem": True,
            "backbone_kwargs": TINY_BACKBONE["backbone_kwargs"], "optimizer": "adamw", "lr": 1e-3,
            "warmup_epochs": 0, **model_args}},
        "data": {"class_path": "Digits", "init_args": {"batch_size": 32, "num_workers": 0, "views": "supervised"}},
    }
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.parametrize("args, match", [
    (["--rounds", "0"], "--rounds must be at least 1"),
    (["--rounds", "2", "--alpha", "1.5"], r"alpha .* \[0, 1\], got 1.5"),
    (["--rounds", "2", "--run_name", "a/b"], "plain directory name"),
])
def test_driver_refuses_bad_arguments(tmp_path, capsys, args, match):
    base = {"--config": str(tiny_recipe(tmp_path)), "--run_name": "gsd", "--root": str(tmp_path)}
    given = dict(zip(args[::2], args[1::2]))
    with pytest.raises(SystemExit) as exit_:
        rounds_main([arg for key, value in {**base, **given}.items() for arg in (key, value)])
    assert exit_.value.code == 2 and re.search(match, capsys.readouterr().err)


def test_driver_refuses_a_config_of_another_method_a_teacher_in_the_config_and_contradicting_extras(tmp_path):
    common = ["--rounds", "2", "--run_name", "gsd", "--root", str(tmp_path)]
    with pytest.raises(SystemExit, match="trains Classifier; multi-round self-distillation needs model: Guided"):
        rounds_main(["--config", str(CONFIGS / "cifar10" / "classifier.yaml"), *common])
    with pytest.raises(SystemExit, match="the driver gives each round its teacher"):
        rounds_main(["--config", str(tiny_recipe(tmp_path, teacher_ckpt="t.ckpt")), *common])
    for extra, match in ((["--seed_everything", "3"], "use the driver's --seed"),
                         (["--model.init_args.teacher_ckpt=t.ckpt"], "the driver sets it for each round")):
        with pytest.raises(SystemExit, match=match):
            rounds_main(["--config", str(tiny_recipe(tmp_path)), *common, "--", *extra])


def test_driver_refuses_a_finished_round_whose_checkpoint_is_missing(tmp_path):
    round_zero = tmp_path / "gsd" / "round_0"
    round_zero.mkdir(parents=True)
    missing = round_zero / "checkpoints" / "last.ckpt"
    (round_zero / "round.json").write_text(json.dumps({"round": 0, "alpha": None, "seed": 0, "teacher_ckpt": None,
                                                       "checkpoint": str(missing)}))
    with pytest.raises(SystemExit, match=f"round 0 finished .* but its checkpoint {missing} is missing"):
        rounds_main(["--config", str(tiny_recipe(tmp_path)), "--rounds", "2", "--run_name", "gsd", "--root",
                     str(tmp_path)])


# ----------------------------------------------------------------- the driver: kill and resume
#: the most one fit or test of a tiny round may take on a loaded 2-core machine
RUN_TIMEOUT = 150


def start_driver(*args: str) -> subprocess.Popen:
    """The driver as a process of its own group, to be killed as a whole."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "ssl_lightning.methods.supervised.rounds", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {str(path.relative_to(folder)): (path.stat().st_mtime_ns, path.read_bytes())
            for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_killed_driver_resumes_at_the_interrupted_round_from_its_checkpoint(tmp_path, capfd, caplog):
    # The uninterrupted invocations run in this process; the one killed is a process of its own.
    recipe = tiny_recipe(tmp_path)
    # SIGSTOP after step 2 of a round (before its step-2 checkpoint: checkpoint callbacks run last), so the
    # kill below lands in round 1 with step 1 saved, whatever the timing.
    stops = tmp_path / "stop_at_step_2.yaml"
    stops.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "helpers.kill_switch.SignalsAtSteps", "init_args": {"signals": {2: "SIGSTOP"}}}]}}))
    group = tmp_path / "runs" / "gsd"
    common = ["--run_name", "gsd", "--root", str(tmp_path / "runs"), "--", "--checkpoint_every_n_steps", "1"]

    rounds_main(["--config", str(recipe), "--rounds", "1", *common])  # round 0 alone
    round_zero = snapshot(group / "round_0")
    assert json.loads((group / "round_0" / "round.json").read_text())["teacher_ckpt"] is None

    driver = start_driver("--config", str(recipe), "--config", str(stops), "--rounds", "3", *common)
    saved = group / "round_1" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 2 * RUN_TIMEOUT
    while not saved.is_file() and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and round 1's fit, with no chance to clean up
    output, _ = driver.communicate(timeout=30)
    assert saved.is_file(), output[-4000:]
    assert not (group / "round_1" / "round.json").exists() and not (group / "round_2").exists()

    capfd.readouterr()
    caplog.clear()
    caplog.set_level("INFO")
    rounds_main(["--config", str(recipe), "--rounds", "3", *common])
    output = capfd.readouterr()
    output = output.out + output.err + caplog.text  # the CLI's resume line is logged (in this process)
    assert "round 0: done" in output and snapshot(group / "round_0") == round_zero  # not retrained
    assert "round 1: resuming its run" in output
    assert "Run 'round_1': resuming from" in output and "(step 1, epoch 0)" in output  # not from step 0
    assert "Run 'round_2': resuming" not in output

    records = json.loads((group / "rounds.json").read_text())["rounds"]
    assert [r["round"] for r in records] == [0, 1, 2] and [r["seed"] for r in records] == [0, 1, 2]
    assert [r["resumed"] for r in records] == [False, True, False]
    assert [r["teacher_ckpt"] for r in records] == [None, records[0]["checkpoint"], records[1]["checkpoint"]]
    for record in records:
        checkpoint = torch.load(record["checkpoint"], map_location="cpu", weights_only=True)
        assert checkpoint["global_step"] == 3  # every round trained to its end
        assert checkpoint["hyper_parameters"]["teacher_ckpt"] == record["teacher_ckpt"]  # what the fit really used
        assert 0 <= record["metrics"]["test_top1"] <= 100 and record["metrics"]["test_ece"] is not None
    table = (group / "rounds.md").read_text()
    assert table.startswith("| round | teacher | alpha |") and "| 2 | round 1 | 0.6 | 2 |" in table and table in output
