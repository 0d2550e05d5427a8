"""The test-time adaptation family (TTAMethod): predict-then-adapt order, exact resets, what Source,
BN-adapt and Tent change, the per-domain report, unlabelled streams, two processes, bad input."""

import copy
import csv
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from ssl_lightning.methods import FAMILIES
from ssl_lightning.methods.tta import BNAdapt, Source, Tent
from ssl_lightning.methods.tta.params import normalisation_affine_parameters

from helpers.threads import one_thread  # noqa: F401 (autouse: one intra-op thread)
from helpers.tta import DOMAINS, RecordSteps, run_tta, tiny_source, tiny_stream, tta_trainer

TTA_METHODS = sorted(FAMILIES["tta"])
BATCHES_PER_DOMAIN = 4  # tiny_stream: 40 images per domain, batches of 10


def logits_with_state(method, state, images):
    """The method's model output on ``images`` with the module state ``state`` (its keys ``model.``)."""
    probe = copy.deepcopy(method)
    probe.load_state_dict(state, strict=True)
    with torch.no_grad():
        return probe.model(images)


def test_tent_predicts_with_the_parameters_from_before_each_update(tmp_path):
    record = RecordSteps()
    method = Tent(source=tiny_source(), lr=0.05)  # a large step, so that the next prediction moves
    run_tta(method, tmp_path, callbacks=[record])
    moved = 0
    for before, after, batch, out in zip(record.before, record.before[1:], record.batches, record.outputs):
        images = batch["views"][0]
        torch.testing.assert_close(out["logits"], logits_with_state(method, before, images), rtol=0, atol=1e-6)
        moved += not torch.allclose(out["logits"], logits_with_state(method, after, images), atol=1e-4)
    assert moved == len(record.outputs) - 1  # every update changed the prediction it would have made


def test_tent_changes_only_normalisation_affine_parameters(tmp_path):
    source = tiny_source()
    method = Tent(source=copy.deepcopy(source))
    run_tta(method, tmp_path)
    affine = {name for name, _ in normalisation_affine_parameters(method.model)}
    assert affine == {"backbone.1.weight", "backbone.1.bias"}
    for name, parameter in method.model.named_parameters():
        if name in affine:
            assert not torch.equal(parameter, source.get_parameter(name)), name
        else:
            assert torch.equal(parameter, source.get_parameter(name)), name
    assert method.model.backbone[1].running_mean is None  # test-batch statistics, no source statistics left


def test_bn_adapt_normalises_with_each_test_batch_and_changes_no_parameter(tmp_path):
    source = tiny_source()
    record = RecordSteps()
    method = BNAdapt(source=copy.deepcopy(source))
    run_tta(method, tmp_path, callbacks=[record])
    conv, norm = source.backbone[0], source.backbone[1]
    for batch, out in zip(record.batches, record.outputs):
        hidden = conv(batch["views"][0])
        mean, var = hidden.mean(dim=(0, 2, 3)), hidden.var(dim=(0, 2, 3), unbiased=False)
        normalised = (hidden - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + norm.eps)
        features = F.relu(normalised * norm.weight[None, :, None, None] + norm.bias[None, :, None, None]).mean((2, 3))
        torch.testing.assert_close(out["logits"], source.head(features).detach(), rtol=1e-5, atol=1e-5)
    assert all(torch.equal(p, source.get_parameter(n)) for n, p in method.model.named_parameters())


def test_source_uses_the_training_statistics_and_changes_nothing(tmp_path):
    source = tiny_source()
    record = RecordSteps()
    run_tta(Source(source=copy.deepcopy(source)), tmp_path, callbacks=[record])
    source.eval()
    for batch, out in zip(record.batches, record.outputs):
        torch.testing.assert_close(out["logits"], source(batch["views"][0]).detach(), rtol=0, atol=0)


@pytest.mark.parametrize("name", TTA_METHODS)
def test_reset_restores_the_source_state_bit_for_bit(name, tmp_path):
    method = FAMILIES["tta"][name](source=tiny_source())
    trainer, _ = run_tta(method, tmp_path, stream=tiny_stream(tmp_path, num_samples=20), limit_test_batches=3)
    snapshot = {key: value.clone() for key, value in method.state_dict().items()}
    optimizer = method.tta_optimizer
    if name in ("Tent", "CoTTA", "RMT", "ROID"):  # they step on every batch (EATA, SAR may filter all out)
        assert any(not torch.equal(value, method._source_state[key]) for key, value in snapshot.items())
    method.reset()
    state = method.state_dict()
    assert state.keys() == method._source_state.keys()
    for key, value in state.items():
        assert torch.equal(value, method._source_state[key]), key
    if optimizer is not None:  # the optimizer's state at test start: empty, or RMT's moments after its warm-up
        restored, recorded = optimizer.state_dict()["state"], method._source_optimizer_state["state"]
        assert restored.keys() == recorded.keys()
        for index, entry in recorded.items():
            for key, value in entry.items():
                assert torch.equal(restored[index][key], value) if torch.is_tensor(value) else restored[index][key] == value


def test_reset_each_shift_starts_every_domain_from_the_source_model(tmp_path):
    record = RecordSteps()
    method = Tent(source=tiny_source(), lr=0.05)
    run_tta(method, tmp_path, stream=tiny_stream(tmp_path, protocol="reset_each_shift"), callbacks=[record])
    fresh = Tent(source=tiny_source(), lr=0.05)
    first_of_second_domain = record.batches[BATCHES_PER_DOMAIN]
    assert bool(first_of_second_domain["reset"][0]) and int(first_of_second_domain["domain"][0]) == 1
    fresh_record = RecordSteps()
    run_tta(fresh, tmp_path / "fresh", stream=tiny_stream(tmp_path, corruptions=[DOMAINS[1]]),
            callbacks=[fresh_record], limit_test_batches=2)
    for step in range(2):  # the same predictions as a run that starts at that domain
        torch.testing.assert_close(record.outputs[BATCHES_PER_DOMAIN + step]["logits"],
                                   fresh_record.outputs[step]["logits"], rtol=0, atol=1e-6)


def test_episodic_predicts_every_batch_with_the_source_model(tmp_path):
    record = RecordSteps()
    source = tiny_source()
    run_tta(Tent(source=copy.deepcopy(source), lr=0.05, episodic=True), tmp_path, callbacks=[record])
    reference = BNAdapt(source=copy.deepcopy(source))  # Tent before its first step is BN-adapt
    reference_record = RecordSteps()
    run_tta(reference, tmp_path / "reference", callbacks=[reference_record])
    for out, expected in zip(record.outputs, reference_record.outputs):
        torch.testing.assert_close(out["logits"], expected["logits"], rtol=0, atol=1e-6)


def test_the_report_holds_each_domains_error_and_their_mean(tmp_path):
    record = RecordSteps()
    trainer, metrics = run_tta(Tent(source=tiny_source()), tmp_path, callbacks=[record])
    wrong, total = [0, 0], [0, 0]
    for batch, out in zip(record.batches, record.outputs):
        domain = int(batch["domain"][0])
        wrong[domain] += int((out["logits"].argmax(1) != batch["label"]).sum())
        total[domain] += len(batch["label"])
    errors = [100 * w / t for w, t in zip(wrong, total)]
    names = [f"{name}_5" for name in DOMAINS]
    assert metrics["test/error"] == pytest.approx(sum(errors) / 2)
    assert [metrics[f"test/error/{name}"] for name in names] == pytest.approx(errors)
    run = tmp_path / "run"
    with (run / "tta_errors.csv").open() as file:
        rows = list(csv.reader(file))
    assert rows[0] == ["domain", "Tent"]
    assert [row[0] for row in rows[1:]] == [*names, "mean"]
    assert [float(row[1]) for row in rows[1:]] == pytest.approx([*errors, sum(errors) / 2], abs=0.006)
    markdown = (run / "tta_errors.md").read_text()
    assert markdown.startswith("| domain | Tent |\n|---|---|\n") and f"| mean | {sum(errors) / 2:.2f} |" in markdown
    assert "| test | tta-continual | - | test/error |" in (run / "results.md").read_text()


def test_an_unlabelled_stream_still_adapts_and_the_report_says_there_is_no_error(tmp_path):
    source = tiny_source()
    method = Tent(source=copy.deepcopy(source))
    _, metrics = run_tta(method, tmp_path, stream=tiny_stream(tmp_path, labelled=False))
    assert not torch.equal(method.model.backbone[1].weight, source.backbone[1].weight)
    assert math.isnan(metrics["test/error"])
    markdown = (tmp_path / "run" / "tta_errors.md").read_text()
    assert "| mean | n/a |" in markdown and "no error can be computed" in markdown
    assert not (tmp_path / "run" / "results.md").exists()


def test_a_plain_test_set_is_one_domain(tmp_path):
    from ssl_lightning.datamodules import NpzArrays

    from helpers.tta import write_stream_npz

    data = NpzArrays(str(write_stream_npz(tmp_path / "plain.npz")), batch_size=10, num_workers=0)
    _, metrics = run_tta(Tent(source=tiny_source()), tmp_path, stream=data)
    assert set(metrics) == {"test/error", "test/error/test"}


def test_inference_mode_is_refused_for_a_method_that_takes_gradients(tmp_path):
    trainer = tta_trainer(tmp_path, inference_mode=True)
    with pytest.raises(RuntimeError, match=r"Tent adapts with gradients, which Lightning's inference mode forbids: "
                                           r"build the Trainer with inference_mode=False"):
        trainer.test(Tent(source=tiny_source()), datamodule=tiny_stream(tmp_path), verbose=False)
    trainer = tta_trainer(tmp_path, inference_mode=True)  # no gradients: inference mode is fine
    trainer.test(BNAdapt(source=tiny_source()), datamodule=tiny_stream(tmp_path), verbose=False)


def test_a_self_supervised_checkpoint_is_not_a_source_model(tmp_path, method_checkpoint):
    with pytest.raises(ValueError, match=r"Tent: source_ckpt=.*method.ckpt is not a classifier checkpoint: it has no "
                                         r"classifier head \('head.weight'; its modules: backbone, probe, "
                                         r"projector\)\. Tent needs a classifier checkpoint"):
        run_tta(Tent(source_ckpt=str(method_checkpoint)), tmp_path)


def test_bad_sources_are_refused_with_the_reason(tmp_path):
    with pytest.raises(ValueError, match=r"Tent needs a source, and none was given\. Pass "
                                         r"--model\.init_args\.source_ckpt <a Classifier checkpoint>"):
        run_tta(Tent(), tmp_path)
    with pytest.raises(ValueError, match=r"Tent: give one source source, got source_ckpt and source\."):
        Tent(source_ckpt="a.ckpt", source=tiny_source())
    with pytest.raises(ValueError, match=r"BNAdapt: the source model .* has no BatchNorm layer"):
        run_tta(BNAdapt(source=tiny_source(norm="group")), tmp_path)
    with pytest.raises(ValueError, match=r"Tent: the source model .* has no normalisation layer"):
        run_tta(Tent(source=tiny_source(norm="none")), tmp_path)
    with pytest.raises(ValueError, match=r"optimizer must be 'adam' or 'sgd', got 'lamb'"):
        Tent(optimizer="lamb")


def test_a_source_model_for_other_classes_is_refused(tmp_path):
    stream = tiny_stream(tmp_path)
    trainer = tta_trainer(tmp_path)
    method = Tent(source=tiny_source(num_classes=5))
    with pytest.raises(ValueError, match=r"Tent: the source \(.*\) predicts 5 classes, but the data has 3"):
        trainer.test(method, datamodule=stream, verbose=False)


def test_fit_is_refused_with_the_command_to_use(tmp_path):
    from helpers.fakes import fake_loader

    trainer = tta_trainer(tmp_path, max_steps=1)
    with pytest.raises(ValueError, match=r"Tent is a test-time adaptation method: it adapts inside `test`"):
        trainer.fit(Tent(source=tiny_source()), fake_loader(size=8))


class SaveAdaptedState(L.Callback):
    """Each process saves its adapted model at the end of test (ddp_spawn hands nothing else back)."""

    def __init__(self, directory):
        self.directory = directory

    def on_test_end(self, trainer, pl_module):
        torch.save({k: v.detach().cpu() for k, v in pl_module.model.state_dict().items()},
                   self.directory / f"rank{trainer.global_rank}.pt")


@pytest.mark.timeout(180)
def test_two_processes_adapt_one_model_as_one_process_does(tmp_path):
    # GroupNorm, not BatchNorm: with BatchNorm each process would normalise with its half batch (docs/tta.md).
    one = Tent(source=tiny_source(norm="group"), lr=0.05)
    _, single = run_tta(one, tmp_path / "one", stream=tiny_stream(tmp_path, batch_size=10))
    saved = tmp_path / "saved"
    saved.mkdir()
    two = Tent(source=tiny_source(norm="group"), lr=0.05)
    run_tta(two, tmp_path / "two", stream=tiny_stream(tmp_path, batch_size=5), callbacks=[SaveAdaptedState(saved)],
            devices=2, strategy="ddp_spawn")
    states = [torch.load(saved / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    for key, value in one.model.state_dict().items():
        torch.testing.assert_close(states[0][key], states[1][key], rtol=0, atol=0)  # the processes agree exactly
        torch.testing.assert_close(states[0][key], value, rtol=1e-5, atol=1e-6)  # and with one process
    with (tmp_path / "two" / "run" / "tta_errors.csv").open() as file:
        mean_row = list(csv.reader(file))[-1]
    assert float(mean_row[1]) == pytest.approx(single["test/error"], abs=0.006)


@pytest.fixture(scope="module")
def classifier_checkpoint(tmp_path_factory):
    """A 1-step tiny Classifier checkpoint on the stream's .npz (3 classes, RGB): (checkpoint, npz)."""
    from ssl_lightning.datamodules import NpzArrays
    from ssl_lightning.methods import Classifier

    from helpers.fakes import TINY_BACKBONE
    from helpers.tta import write_stream_npz

    folder = tmp_path_factory.mktemp("source")
    npz = write_stream_npz(folder / "data.npz")
    classifier = Classifier(**TINY_BACKBONE, num_classes=3, in_chans=3, batch_size=8)
    trainer = tta_trainer(folder, max_steps=1, limit_val_batches=0, enable_checkpointing=False)
    trainer.fit(classifier, NpzArrays(str(npz), batch_size=8, num_workers=0, views="supervised"))
    trainer.save_checkpoint(folder / "classifier.ckpt")
    return folder / "classifier.ckpt", npz


def tiny_recipe(name, npz, folder, keep_inference_mode=True):
    """configs/tta/cifar10c_<name>.yaml on the tiny stream, written into ``folder``."""
    import yaml

    from helpers.paths import CONFIGS

    recipe = yaml.safe_load((CONFIGS / "tta" / f"cifar10c_{name}.yaml").read_text())
    if not keep_inference_mode:
        del recipe["trainer"]["inference_mode"]
    recipe["data"]["init_args"].update(
        source={"class_path": "NpzArrays", "init_args": {"path": str(npz), "num_workers": 0}},
        corruptions=DOMAINS, batch_size=10, num_workers=0, cache_dir=str(folder / "cache"))
    recipe["trainer"].update(accelerator="cpu", logger=False, enable_progress_bar=False)
    path = folder / f"cifar10c_{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_the_cli_runs_a_recipe_against_a_classifier_checkpoint(tmp_path, classifier_checkpoint):
    from ssl_lightning.cli import main

    checkpoint, npz = classifier_checkpoint
    # without trainer.inference_mode: the CLI turns inference mode off for these methods by itself
    recipe = tiny_recipe("tent", npz, tmp_path, keep_inference_mode=False)
    main(["test", "--config", str(recipe), "--model.source_ckpt", str(checkpoint), "--run_name", "tent", "--root",
          str(tmp_path / "runs")])
    with (tmp_path / "runs" / "tent" / "tta_errors.csv").open() as file:
        rows = list(csv.reader(file))
    assert rows[0] == ["domain", "Tent"] and [row[0] for row in rows[1:]] == [f"{d}_5" for d in DOMAINS] + ["mean"]


@pytest.mark.timeout(300)
def test_compare_runs_several_recipes_into_one_table(tmp_path, classifier_checkpoint):
    from ssl_lightning.methods.tta.compare import main
    from ssl_lightning.methods.tta.report import read_error_table

    checkpoint, npz = classifier_checkpoint
    recipes = [str(tiny_recipe(name, npz, tmp_path)) for name in ("source", "bn_adapt")]
    main(["--source_ckpt", str(checkpoint), "--configs", *recipes, "--root", str(tmp_path / "runs"), "--",
          "--seed_everything", "3"])
    domains, errors = read_error_table(tmp_path / "runs" / "tta_errors.csv")
    assert domains == [f"{d}_5" for d in DOMAINS] and list(errors) == ["Source", "BNAdapt"]
    for name, method in (("cifar10c_source", "Source"), ("cifar10c_bn_adapt", "BNAdapt")):
        assert read_error_table(tmp_path / "runs" / name / "tta_errors.csv")[1][method] == errors[method]
    markdown = (tmp_path / "runs" / "tta_errors.md").read_text()
    assert markdown.startswith("| domain | Source | BNAdapt |") and "Time per 10,000 images" in markdown
