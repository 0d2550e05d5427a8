"""CoTTA and RMT: the restore mask, the augmentation-averaged teacher, the EMA teachers, the predictions,
RMT's prototypes, warm-up, replay and source-free mode (the augmentation: test_tta_augment.py)."""

import copy
import math

import pytest
import torch

from ssl_lightning.losses.tta_consistency import teacher_cross_entropy
from ssl_lightning.methods.tta.augment import PixelAugment
from ssl_lightning.methods.tta.cotta import CoTTA, stochastic_restore_
from ssl_lightning.methods.tta.params import use_test_batch_statistics
from ssl_lightning.methods.tta.rmt import RMT

from helpers.threads import one_thread  # noqa: F401 (autouse: one intra-op thread)
from helpers.tta import RecordSteps, run_tta, tiny_source, tiny_stream


def source_with_batch_statistics():
    model = tiny_source()
    use_test_batch_statistics(model)
    return model.eval()


def part(state, prefix):
    return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}


def states_after(record, method):
    """The method's state after each batch: the next batch's state before it, the final state last."""
    return record.before[1:] + [{key: value.clone() for key, value in method.state_dict().items()}]


def teacher_with(method, state):
    teacher = copy.deepcopy(method.teacher)
    teacher.load_state_dict(part(state, "teacher."))
    return teacher


def assert_ema(record, method, momentum):
    """teacher_{k+1} = m teacher_k + (1 - m) student_{k+1}, for every teacher tensor."""
    for before, after in zip(record.before, states_after(record, method)):
        teacher_before, teacher_after, student = (part(before, "teacher.module."), part(after, "teacher.module."),
                                                  part(after, "model."))
        assert teacher_after.keys() == student.keys()
        for key, value in teacher_after.items():
            expected = momentum * teacher_before[key] + (1 - momentum) * student[key]
            torch.testing.assert_close(value, expected, rtol=0, atol=1e-6)
            assert not torch.equal(value, teacher_before[key]), key


# ------------------------------------------------------------------------------------------ CoTTA
def test_stochastic_restore_restores_a_binomial_fraction_exactly_to_the_source():
    generator = torch.Generator().manual_seed(0)
    source = [torch.randn(300, 200, generator=generator), torch.randn(40_000, generator=generator)]
    parameters = [tensor + 1.0 for tensor in source]
    probability, total = 0.01, sum(tensor.numel() for tensor in source)
    stochastic_restore_(parameters, source, probability, torch.Generator().manual_seed(1))
    restored = sum(int((p == s).sum()) for p, s in zip(parameters, source))
    bound = 5 * math.sqrt(total * probability * (1 - probability))  # five standard deviations of the binomial
    assert abs(restored - total * probability) < bound, (restored, total * probability, bound)
    for p, s in zip(parameters, source):  # every element is the source value or untouched, exactly
        assert torch.all((p == s) | (p == s + 1.0))
    again = [tensor + 1.0 for tensor in source]
    stochastic_restore_(again, source, probability, torch.Generator().manual_seed(1))
    assert all(torch.equal(a, p) for a, p in zip(again, parameters))  # the seeded mask repeats
    for probability, expected in ((0.0, 0), (1.0, total)):
        edge = [tensor + 1.0 for tensor in source]
        stochastic_restore_(edge, source, probability, torch.Generator().manual_seed(2))
        assert sum(int((p == s).sum()) for p, s in zip(edge, source)) == expected


def test_cotta_averages_augmentations_exactly_when_the_anchor_is_unsure_and_predicts_with_the_teacher(
        tmp_path, monkeypatch):
    stream = tiny_stream(tmp_path)
    anchor = source_with_batch_statistics()
    stream.setup("test")
    batches = list(stream.test_dataloader())
    with torch.no_grad():
        confidence = [float(anchor(b["views"][0]).softmax(1).amax(1).mean()) for b in batches]
    ordered = sorted(confidence)
    threshold = (ordered[3] + ordered[4]) / 2  # four unsure batches, four confident ones
    augmented = []  # per call: the augmented images
    forward = PixelAugment.forward
    monkeypatch.setattr(PixelAugment, "forward",
                        lambda self, images: augmented.append(forward(self, images)) or augmented[-1])
    record, calls = RecordSteps(), []

    class Counting(CoTTA):
        def forward_and_adapt(self, images):
            start = len(augmented)
            logits = super().forward_and_adapt(images)
            calls.append(augmented[start:])
            return logits

    method = Counting(source=tiny_source(), anchor_threshold=threshold, num_augmentations=3, lr=0.01)
    run_tta(method, tmp_path, stream=tiny_stream(tmp_path), callbacks=[record])
    assert [len(c) for c in calls] == [3 if c < threshold else 0 for c in confidence]
    for before, batch, out, copies in zip(record.before, record.batches, record.outputs, calls):
        teacher = teacher_with(method, before)
        with torch.no_grad():
            if copies:
                expected = torch.stack([teacher(images) for images in copies]).mean(0)
            else:
                expected = teacher(batch["views"][0])
        torch.testing.assert_close(out["logits"], expected, rtol=0, atol=1e-6)


def test_cotta_first_step_is_adam_on_the_cross_entropy_to_the_teacher_over_every_parameter(tmp_path):
    record = RecordSteps()
    method = CoTTA(source=tiny_source(), anchor_threshold=0.0, restore_probability=0.0, lr=0.01)
    run_tta(method, tmp_path, callbacks=[record], limit_test_batches=1)
    images = record.batches[0]["views"][0]
    student, teacher = source_with_batch_statistics(), source_with_batch_statistics()
    student.requires_grad_(True)
    optimizer = torch.optim.Adam(student.parameters(), lr=0.01, betas=(0.9, 0.999))
    with torch.no_grad():
        targets = teacher(images)
    teacher_cross_entropy(student(images), targets).mean().backward()
    optimizer.step()
    after = part(method.state_dict(), "model.")
    assert after.keys() == dict(student.named_parameters()).keys()
    for name, parameter in student.named_parameters():
        if name == "backbone.0.bias":
            # BatchNorm cancels the conv bias: its gradient is zero up to rounding, and Adam's normalised
            # step turns rounding noise into a move of either sign, so only the gradient is checked.
            assert parameter.grad.abs().max() < 1e-6
            continue
        torch.testing.assert_close(after[name], parameter.detach(), rtol=0, atol=1e-6)
        assert not torch.equal(after[name], tiny_source().get_parameter(name)), name
    assert [id(p) for p in method.adapted] == [id(p) for p in method.model.parameters()]  # every one adapts
    torch.testing.assert_close(record.outputs[0]["logits"], targets, rtol=0, atol=1e-6)


def test_cotta_teacher_follows_the_ema_formula(tmp_path):
    record = RecordSteps()
    method = CoTTA(source=tiny_source(), teacher_momentum=0.9, restore_probability=0.0, num_augmentations=2,
                   lr=0.01)
    run_tta(method, tmp_path, callbacks=[record], limit_test_batches=4)
    assert_ema(record, method, 0.9)


def test_cotta_with_certain_restore_ends_each_step_at_the_source_weights(tmp_path):
    source = tiny_source()
    method = CoTTA(source=copy.deepcopy(source), restore_probability=1.0, num_augmentations=2, lr=0.01)
    run_tta(method, tmp_path, limit_test_batches=3)
    for name, parameter in method.model.named_parameters():
        assert torch.equal(parameter, source.get_parameter(name)), name
    teacher = dict(method.teacher.module.named_parameters())
    assert any(not torch.equal(teacher[name], p) for name, p in source.named_parameters())  # it followed the steps


def test_cotta_runs_reproducibly_with_a_seed(tmp_path):
    outputs = []
    for run in range(2):
        torch.manual_seed(5)
        record = RecordSteps()
        run_tta(CoTTA(source=tiny_source(), anchor_threshold=1.0, num_augmentations=2), tmp_path / str(run),
                stream=tiny_stream(tmp_path), callbacks=[record], limit_test_batches=3)
        outputs.append(torch.cat([out["logits"] for out in record.outputs]))
    assert torch.equal(*outputs)


def test_cotta_bad_arguments_are_refused():
    with pytest.raises(ValueError, match=r"CoTTA: teacher_momentum and restore_probability must lie in \[0, 1\]"):
        CoTTA(restore_probability=1.5)
    with pytest.raises(ValueError, match=r"CoTTA: num_augmentations must be >= 1, got 0"):
        CoTTA(num_augmentations=0)


# ------------------------------------------------------------------------------------------ RMT
@pytest.fixture
def source_reads(monkeypatch):
    """Every source_batches call of RMT: (num_samples, batch_size, seed, batches yielded)."""
    calls = []
    original = RMT.source_batches

    def counting(self, num_samples, batch_size, seed=0):
        calls.append([num_samples, batch_size, seed, 0])
        for batch in original(self, num_samples, batch_size, seed):
            calls[-1][3] += 1
            yield batch

    monkeypatch.setattr(RMT, "source_batches", counting)
    return calls


def test_rmt_predicts_with_the_student_plus_teacher_ensemble_and_its_teacher_follows_the_ema(tmp_path):
    record = RecordSteps()
    method = RMT(source=tiny_source(), teacher_momentum=0.9, warmup_steps=0, lr=0.01)
    run_tta(method, tmp_path, callbacks=[record], limit_test_batches=4)
    for before, batch, out in zip(record.before, record.batches, record.outputs):
        probe = copy.deepcopy(method)
        probe.load_state_dict(before)
        images = batch["views"][0]
        with torch.no_grad():
            expected = probe.model(images) + probe.teacher(images)
        torch.testing.assert_close(out["logits"], expected, rtol=0, atol=1e-6)
    assert_ema(record, method, 0.9)


def test_rmt_prototypes_are_the_mean_source_features_of_each_class_before_the_warm_up(tmp_path, source_reads):
    method = RMT(source=tiny_source(), warmup_steps=2, lr=0.01)
    run_tta(method, tmp_path, limit_test_batches=1)
    samples, batch_size, seed, _ = source_reads[0]
    assert (samples, batch_size, seed) == (100_000, 10, 0)
    model = source_with_batch_statistics()  # the source model, as before the warm-up
    sums, counts = torch.zeros(3, 8, dtype=torch.float64), torch.zeros(3)
    with torch.no_grad():
        for batch in method.source_batches(samples, batch_size, seed):
            features = model.backbone(batch["views"][0]).double()
            for row, label in zip(features, batch["label"].tolist()):
                sums[label] += row
                counts[label] += 1
    assert counts.tolist() == [8, 8, 8]  # the tiny stream's 24 training images
    expected = (sums / counts[:, None]).float()
    torch.testing.assert_close(method._source_state["prototypes"], expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(method.prototypes, expected, rtol=0, atol=0)  # constants: adaptation keeps them


def test_rmt_warms_up_on_source_images_with_a_rising_lr_and_keeps_the_warm_optimizer(tmp_path, monkeypatch,
                                                                                     source_reads):
    rates = []
    step = torch.optim.Adam.step
    monkeypatch.setattr(torch.optim.Adam, "step",
                        lambda self, *a, **k: rates.append(self.param_groups[0]["lr"]) or step(self, *a, **k))
    source = tiny_source()
    method = RMT(source=copy.deepcopy(source), warmup_steps=4, lr=0.01)
    run_tta(method, tmp_path, limit_test_batches=2)
    assert rates == pytest.approx([0.0025, 0.005, 0.0075, 0.01, 0.01, 0.01])
    warm = method._source_state  # the state a reset restores: after the warm-up
    for name, parameter in source.named_parameters():
        assert not torch.equal(warm[f"model.{name}"], parameter), name
        assert not torch.equal(warm[f"teacher.module.{name}"], parameter), name
    projector = {id(p) for p in method.projector.parameters()}
    snapshot = method._source_optimizer_state
    ids = [p for group in method.tta_optimizer.param_groups for p in group["params"]]
    for index, parameter in enumerate(ids):  # Adam moments of 4 warm-up steps; the projector untouched
        if id(parameter) in projector:
            assert index not in snapshot["state"]
        else:
            assert float(snapshot["state"][index]["step"]) == 4
    # prototypes (seed 0, 24 images in 3 batches); 4 warm-up batches: the pass seeded 1 (10, 10, 4 images),
    # then one of the pass seeded 3; the replay's pass seeded 2, one batch per step
    assert [(call[2], call[3]) for call in source_reads] == [(0, 3), (1, 3), (3, 1), (2, 2)]
    method.reset()
    assert method.tta_optimizer.state_dict()["state"].keys() == snapshot["state"].keys()
    for key, value in method.state_dict().items():
        assert torch.equal(value, warm[key]), key


def test_rmt_replays_one_source_batch_per_step_and_starts_over_at_a_reset(tmp_path, source_reads):
    method = RMT(source=tiny_source(), warmup_steps=0, lr=0.01)
    run_tta(method, tmp_path, stream=tiny_stream(tmp_path, protocol="reset_each_shift"))
    replay = [call for call in source_reads if call[0] is None]
    # 4 steps per domain, batches of 10 from 24 images: per domain, passes with seeds 2 (3 batches), 4 (1)
    assert [(call[2], call[3]) for call in replay] == [(2, 3), (4, 1), (2, 3), (4, 1)]


def test_rmt_source_free_reads_no_source_data(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("source_free read source data")

    monkeypatch.setattr(RMT, "source_batches", refuse)
    source = tiny_source()
    method = RMT(source=copy.deepcopy(source), source_free=True, lr=0.01)
    _, metrics = run_tta(method, tmp_path)
    assert method.projector is None and "prototypes" not in method.state_dict()
    assert not torch.equal(method.model.backbone[0].weight, source.backbone[0].weight)  # it adapted
    assert set(metrics) == {"test/error", "test/error/gaussian_noise_5", "test/error/fog_5"}
    with pytest.raises(AssertionError, match="source_free read source data"):  # the default does read it
        run_tta(RMT(source=tiny_source()), tmp_path / "with-source")


def test_rmt_contrastive_term_trains_the_projector(tmp_path):
    method = RMT(source=tiny_source(), warmup_steps=0, source_replay=False, lr=0.01)
    run_tta(method, tmp_path, limit_test_batches=2)
    before = part(method._source_state, "projector.")
    assert before and all(not torch.equal(p, before[name]) for name, p in method.projector.named_parameters())
    without = RMT(source=tiny_source(), lambda_contrastive=0.0, warmup_steps=0, source_replay=False)
    run_tta(without, tmp_path / "without", limit_test_batches=1)
    assert without.projector is None


def test_rmt_bad_arguments_are_refused():
    with pytest.raises(ValueError, match=r"RMT: temperature and projection_dim must be positive, got 0"):
        RMT(temperature=0)
    with pytest.raises(ValueError, match=r"RMT: the lambdas and warmup_steps must be >= 0"):
        RMT(warmup_steps=-1)
    with pytest.raises(ValueError, match=r"RMT: source_batch_size must be >= 1 or None"):
        RMT(source_batch_size=0)
