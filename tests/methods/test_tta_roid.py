"""ROID: the loss gradient equals the benchmark's loss_calculation written plainly, weight ensembling is
exactly m * theta + (1 - m) * theta_source, the class-probability average follows its formula, the
prediction comes from the parameters before the update with the prior correction applied, only the
normalisation layers' affine parameters change, reset, two processes adapting as one, bad input (the
augmentation: test_tta_augment.py)."""

import copy

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from ssl_lightning.losses.roid import batch_class_prior, prior_correction
from ssl_lightning.methods.tta.augment import tta_augment
from ssl_lightning.methods.tta.params import normalisation_affine_parameters
from ssl_lightning.methods.tta.roid import ROID

from helpers.threads import one_thread  # noqa: F401 (autouse: one intra-op thread)
from helpers.tta import RecordSteps, run_tta, tiny_source, tiny_stream


def callback(**hooks):
    """A Lightning callback with the given hooks."""
    return type("Hooks", (L.Callback,), hooks)()


def plain_logits(method, state, images):
    """The source model's output on ``images`` under the module state ``state`` (no prior correction)."""
    probe = copy.deepcopy(method)
    probe.load_state_dict(state, strict=True)
    with torch.no_grad():
        return probe.model(images)


def benchmark_loss(model, images, ema, temperature, use_weighting, use_consistency, mean, std, generator):
    """mariodoebler/test-time-adaptation classification/methods/roid.py ``loss_calculation``, written
    plainly (boolean masks, the kept images selected, the losses of classification/utils/losses.py)."""
    outputs = model(images)
    keep = torch.ones(len(images), dtype=torch.bool)
    weights = torch.ones(len(images))
    if use_weighting:
        with torch.no_grad():
            probs = outputs.softmax(1)
            div = 1 - F.cosine_similarity(ema.unsqueeze(0), probs, dim=1)
            div = (div - div.min()) / (div.max() - div.min())
            keep = ~(div < div.mean())
            cert = (probs * outputs.log_softmax(1)).sum(1)
            cert = (cert - cert.min()) / (cert.max() - cert.min())
            weights = torch.exp(div * cert / temperature)
            weights[~keep] = 0.0
    p = outputs.softmax(1).clamp(0.0, 0.99)
    slr = -(p * torch.log(p / (1 - p) + 1e-5)).sum(1)
    loss = (slr * weights)[keep].sum() / len(images)
    if use_consistency:
        pixels = images[keep] * std + mean
        augmented = (tta_augment(pixels, generator, padding_mode="reflect", cotta_augs=False) - mean) / std
        x, x_ema = model(augmented), outputs[keep]
        sce = -0.5 * (x_ema.softmax(1) * x.log_softmax(1)).sum(1) - 0.5 * (x.softmax(1) * x_ema.log_softmax(1)).sum(1)
        loss = loss + (sce * weights[keep]).sum() / len(images)
    return loss


@pytest.mark.parametrize("use_weighting, use_consistency", [(True, True), (False, True), (True, False)])
def test_the_gradient_is_the_benchmarks_loss_gradient(use_weighting, use_consistency, tmp_path):
    captured = {}

    def on_test_batch_start(self, trainer, method, batch, batch_idx, dataloader_idx=0):
        if batch_idx != 1:  # the second batch: the class-probability average is no longer uniform
            return
        generator = copy.deepcopy(method.augment.generator) if use_consistency else None
        captured.update(model=copy.deepcopy(method.model), ema=method.class_probs_ema.clone(),
                        images=batch["views"][0], generator=generator)
        def keep_gradients(*_):
            captured["grads"] = [parameter.grad.clone() for parameter in method.adapted]

        method.tta_optimizer.register_step_pre_hook(keep_gradients)

    method = ROID(source=tiny_source(), use_weighting=use_weighting, use_consistency=use_consistency)
    run_tta(method, tmp_path, callbacks=[callback(on_test_batch_start=on_test_batch_start)], limit_test_batches=2)
    model = captured["model"]
    loss = benchmark_loss(model, captured["images"], captured["ema"], 1 / 3, use_weighting, use_consistency,
                          *((method.augment.mean, method.augment.std) if use_consistency else (None, None)),
                          captured["generator"])  # the method's generator state: the same augmentation draws
    parameters = [parameter for _, parameter in normalisation_affine_parameters(model)]
    expected = torch.autograd.grad(loss, parameters)
    assert len(expected) == len(captured["grads"]) == 2
    for got, want in zip(captured["grads"], expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
        assert want.abs().max() > 1e-4


def test_weight_ensembling_is_exactly_the_momentum_average_with_the_source(tmp_path):
    source = tiny_source()
    stepped, checked = [], []

    def on_test_batch_start(self, trainer, method, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0:  # the optimizer exists once the test started (the callbacks' on_test_start runs first)
            method.tta_optimizer.register_step_post_hook(
                lambda *_: stepped.append([p.detach().clone() for p in method.adapted]))

    def on_test_batch_end(self, trainer, method, outputs, batch, batch_idx, dataloader_idx=0):
        sources = [source.get_parameter(name) for name, _ in normalisation_affine_parameters(method.model)]
        for parameter, after_step, source_value in zip(method.adapted, stepped[-1], sources):
            assert not torch.equal(after_step, source_value)  # the step moved it
            assert torch.equal(parameter, 0.9 * after_step + (1 - 0.9) * source_value)
        checked.append(batch_idx)

    method = ROID(source=copy.deepcopy(source), momentum_src=0.9, lr=0.05)
    run_tta(method, tmp_path, callbacks=[callback(on_test_batch_start=on_test_batch_start, on_test_batch_end=on_test_batch_end)])
    assert checked == list(range(8))


def test_momentum_src_one_keeps_the_stepped_parameters(tmp_path):
    method = ROID(source=tiny_source(), momentum_src=1.0)
    run_tta(method, tmp_path, limit_test_batches=1)
    before = [p.detach().clone() for p in method.adapted]
    method.ensemble_with_source()
    assert all(torch.equal(a, b) for a, b in zip(method.adapted, before))


def test_predictions_come_from_the_parameters_before_the_update_with_the_prior_correction(tmp_path):
    record = RecordSteps()
    method = ROID(source=tiny_source(), lr=0.05)
    run_tta(method, tmp_path, callbacks=[record])
    corrected = moved = 0
    for before, after, batch, out in zip(record.before, record.before[1:], record.batches, record.outputs):
        images = batch["views"][0]
        logits = plain_logits(method, before, images)
        prior, count = batch_class_prior(logits)
        torch.testing.assert_close(out["logits"], prior_correction(logits, prior, count), rtol=0, atol=1e-6)
        corrected += not torch.allclose(out["logits"], logits, atol=1e-4)
        moved += not torch.allclose(plain_logits(method, after, images), logits, atol=1e-4)
    assert corrected == moved == len(record.outputs) - 1


def test_without_prior_correction_the_prediction_is_the_plain_logits(tmp_path):
    record = RecordSteps()
    method = ROID(source=tiny_source(), use_prior_correction=False)
    run_tta(method, tmp_path, callbacks=[record], limit_test_batches=3)
    for before, batch, out in zip(record.before, record.batches, record.outputs):
        torch.testing.assert_close(out["logits"], plain_logits(method, before, batch["views"][0]), rtol=0, atol=1e-6)


def test_the_class_probability_average_follows_its_formula(tmp_path):
    record = RecordSteps()
    method = ROID(source=tiny_source(), momentum_probs=0.8)
    run_tta(method, tmp_path, callbacks=[record])
    states = [*record.before, method.state_dict()]
    torch.testing.assert_close(states[0]["class_probs_ema"], torch.full((3,), 1 / 3))
    for before, after, batch in zip(states, states[1:], record.batches):
        prior = plain_logits(method, before, batch["views"][0]).softmax(1).mean(0)
        torch.testing.assert_close(after["class_probs_ema"], 0.8 * before["class_probs_ema"] + 0.2 * prior,
                                   rtol=0, atol=1e-6)
    unweighted = ROID(source=tiny_source(), use_weighting=False)
    run_tta(unweighted, tmp_path / "unweighted", limit_test_batches=2)
    assert torch.equal(unweighted.class_probs_ema, torch.full((3,), 1 / 3))  # the benchmark updates it with weights


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_only_the_normalisation_affine_parameters_change_and_reset_restores_everything(norm, tmp_path):
    source = tiny_source(norm=norm)
    method = ROID(source=copy.deepcopy(source))
    run_tta(method, tmp_path, stream=tiny_stream(tmp_path, protocol="continual"))
    affine = {name for name, _ in normalisation_affine_parameters(method.model)}
    assert affine == {"backbone.1.weight", "backbone.1.bias"}
    for name, parameter in method.model.named_parameters():
        assert torch.equal(parameter, source.get_parameter(name)) != (name in affine), name
    assert not torch.equal(method.class_probs_ema, torch.full((3,), 1 / 3))
    method.reset()
    for key, value in method.state_dict().items():
        assert torch.equal(value, method._source_state[key]), key
    assert torch.equal(method.class_probs_ema, torch.full((3,), 1 / 3))
    assert all(torch.equal(p, source.get_parameter(n)) for n, p in method.model.named_parameters())


def test_reset_each_shift_restarts_the_average_and_the_parameters(tmp_path):
    record = RecordSteps()
    method = ROID(source=tiny_source())
    run_tta(method, tmp_path, stream=tiny_stream(tmp_path, protocol="reset_each_shift"), callbacks=[record],
            limit_test_batches=6)
    first_of_second_domain = record.batches[4]
    assert bool(first_of_second_domain["reset"][0])
    # The state recorded before that batch is the adapted one; test_step resets it before predicting.
    fresh = ROID(source=tiny_source())
    fresh_record = RecordSteps()
    run_tta(fresh, tmp_path / "fresh", stream=tiny_stream(tmp_path, corruptions=["fog"]), callbacks=[fresh_record],
            limit_test_batches=2)
    for step in range(2):
        torch.testing.assert_close(record.outputs[4 + step]["logits"], fresh_record.outputs[step]["logits"],
                                   rtol=0, atol=1e-6)


def test_bad_input_is_refused_with_the_reason(tmp_path):
    with pytest.raises(ValueError, match=r"ROID: momentum_src must be in \[0, 1\]"):
        ROID(momentum_src=1.5)
    with pytest.raises(ValueError, match=r"ROID: momentum_probs must be in \[0, 1\]"):
        ROID(momentum_probs=-0.1)
    with pytest.raises(ValueError, match=r"ROID: temperature must be > 0, got 0"):
        ROID(temperature=0)
    with pytest.raises(ValueError, match=r"ROID: the source model .* has no normalisation layer"):
        run_tta(ROID(source=tiny_source(norm="none")), tmp_path)


def test_consistency_needs_the_datas_normalisation(tmp_path):
    from torch.utils.data import DataLoader

    class NoNormalisation(L.LightningDataModule):
        def test_dataloader(self):
            return DataLoader([{"views": [torch.rand(3, 16, 16)], "label": 0}] * 4, batch_size=4)

    with pytest.raises(ValueError, match=r"ROID augments test images in pixel space, so it needs the data's mean "
                                         r"and std, which NoNormalisation does not give.*or set use_consistency: false"):
        run_tta(ROID(source=tiny_source()), tmp_path, stream=NoNormalisation())
    _, metrics = run_tta(ROID(source=tiny_source(), use_consistency=False), tmp_path / "plain",
                         stream=NoNormalisation())
    assert set(metrics) == {"test/error", "test/error/test"}


class SaveState(L.Callback):
    """Each process saves the method's state at the end of test (ddp_spawn hands nothing else back)."""

    def __init__(self, directory):
        self.directory = directory

    def on_test_end(self, trainer, pl_module):
        torch.save({k: v.detach().cpu() for k, v in pl_module.state_dict().items()},
                   self.directory / f"rank{trainer.global_rank}.pt")


@pytest.mark.timeout(180)
def test_two_processes_adapt_one_model_as_one_process_does(tmp_path):
    # GroupNorm: with BatchNorm each process would normalise with its half batch. Both processes draw the
    # one process's augmentations (only rank 0 prepares the data, which uses the global RNG: the method's
    # generator is independent of it), and the weights and the prior are over the global batch.
    L.seed_everything(3)
    one = ROID(source=tiny_source(norm="group"), lr=0.05)
    run_tta(one, tmp_path / "one", stream=tiny_stream(tmp_path, batch_size=10))
    saved = tmp_path / "saved"
    saved.mkdir()
    L.seed_everything(3)
    two = ROID(source=tiny_source(norm="group"), lr=0.05)
    run_tta(two, tmp_path / "two", stream=tiny_stream(tmp_path, batch_size=5), callbacks=[SaveState(saved)],
            devices=2, strategy="ddp_spawn")
    states = [torch.load(saved / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    assert "class_probs_ema" in states[0]
    for key, value in one.state_dict().items():
        torch.testing.assert_close(states[0][key], states[1][key], rtol=0, atol=0)  # the processes agree exactly
        torch.testing.assert_close(states[0][key], value, rtol=1e-5, atol=1e-6)  # and with one process
    assert not torch.equal(one.model.backbone[1].weight, tiny_source(norm="group").backbone[1].weight)
