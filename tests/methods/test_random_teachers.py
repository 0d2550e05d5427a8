"""What Random Teachers promises beyond its family: the teacher never changes through a fit, the student
starts where ``student_init`` says, the objective is the paper's cross-entropy of one view against itself
(value and gradients against a float64 reference), the frozen teacher's kNN accuracy is reported beside the
student's, and the errors for a wrong view recipe and bad options."""

import copy
import math

import pytest
import torch
from torch import nn

from ssl_lightning.callbacks import KNNReport
from ssl_lightning.datamodules import Digits
from ssl_lightning.methods.ssl.random_teachers import RandomTeachers
from ssl_lightning.metrics.knn import knn_accuracy

from helpers.fakes import fake_loader, quick_trainer, tiny_method


def tiny_random_teachers(**kwargs):
    defaults = {"in_chans": 1, "num_classes": 4, "batch_size": 8}
    return tiny_method(RandomTeachers, **{**defaults, **kwargs})


def one_view_loader(**kwargs):
    return fake_loader(batch_size=8, num_views=1, size=16, **kwargs)


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


def student_network(model) -> nn.Module:
    return model._online_network()


def record_fresh_draw(model, monkeypatch) -> dict:
    """Keeps a copy of the fresh random network that ``build_heads`` mixes into the student."""
    drawn, original = {}, model.fresh_online_network

    def record(feat_dim):
        network = original(feat_dim)
        drawn["network"] = copy.deepcopy(network)
        return network

    monkeypatch.setattr(model, "fresh_online_network", record)
    return drawn


# ---------------------------------------------------------------- the frozen teacher


def test_teacher_is_bit_identical_after_a_fit_while_the_student_trains():
    model = tiny_random_teachers(lr=0.3)
    model.configure_model()
    teacher_before = snapshot(model.teacher)
    student_before = snapshot(student_network(model))
    assert not any(p.requires_grad for p in model.teacher.parameters())

    quick_trainer(max_steps=4, limit_val_batches=2, val_check_interval=2).fit(
        model, one_view_loader(length=32), one_view_loader(length=16))

    teacher_after = model.teacher.state_dict()
    assert teacher_after.keys() == teacher_before.keys()
    for key, value in teacher_before.items():  # weights and BatchNorm buffers, through training and validation
        assert torch.equal(teacher_after[key], value), key
    student_after = student_network(model).state_dict()
    moved = [key for key, value in student_before.items() if not torch.equal(student_after[key], value)]
    assert "0.conv1.weight" in moved and "1.last_layer.weight" in moved  # the student learned meanwhile


# ---------------------------------------------------------------- student initialisation


def test_close_student_at_alpha_zero_starts_as_an_exact_copy_of_the_teacher():
    model = tiny_random_teachers()  # the paper's default: student_init close, alpha 0
    model.configure_model()
    teacher = model.teacher.module.state_dict()
    student = student_network(model).state_dict()
    assert teacher.keys() == student.keys()
    assert all(torch.equal(student[key], teacher[key]) for key in teacher)


def test_independent_student_is_a_fresh_draw_that_differs_from_the_teacher(monkeypatch):
    torch.manual_seed(0)
    model = tiny_random_teachers(student_init="independent")
    drawn = record_fresh_draw(model, monkeypatch)
    model.configure_model()
    fresh = dict(drawn["network"].named_parameters())
    teacher = dict(model.teacher.module.named_parameters())
    for name, param in student_network(model).named_parameters():
        assert torch.equal(param, fresh[name]), name  # the student is the new draw itself
        if param.dim() > 1:  # every randomly initialised tensor (not BatchNorm's ones and zeros)
            assert not torch.equal(param, teacher[name]), name
    assert torch.equal(model.projector.last_layer.gain, torch.ones_like(model.projector.last_layer.gain))


@pytest.mark.parametrize("alpha", [0.01, 0.5])
def test_close_student_is_the_variance_preserving_interpolation_within_its_stated_distance(alpha, monkeypatch):
    torch.manual_seed(0)
    model = tiny_random_teachers(student_init="close", student_init_alpha=alpha)
    drawn = record_fresh_draw(model, monkeypatch)
    model.configure_model()
    fresh = dict(drawn["network"].named_parameters())
    teacher = dict(model.teacher.module.named_parameters())
    scale = 1 / math.sqrt((1 - alpha) ** 2 + alpha**2)
    student = dict(student_network(model).named_parameters())
    for name, param in student.items():
        expected = ((1 - alpha) * teacher[name].double() + alpha * fresh[name].double()) * scale
        torch.testing.assert_close(param.double(), expected, rtol=1e-6, atol=1e-7)

    def norm(tensors):
        return math.sqrt(sum(float(t.detach().double().pow(2).sum()) for t in tensors))

    names = [name for name, param in student.items() if param.requires_grad]
    distance = norm(student[n] - teacher[n] for n in names)
    teacher_norm, fresh_norm = norm(teacher[n] for n in names), norm(fresh[n] for n in names)
    # theta_S - theta_T = ((1 - a) s - 1) theta_T + a s theta~, s = 1 / sqrt((1 - a)^2 + a^2)
    bound = abs((1 - alpha) * scale - 1) * teacher_norm + alpha * scale * fresh_norm
    assert distance <= bound * (1 + 1e-6)
    independent = norm(fresh[n] - teacher[n] for n in names)
    assert distance < 1.5 * alpha * independent  # close to the teacher, relative to an independent draw
    for key, buffer in student_network(model).named_buffers():  # BatchNorm statistics, the frozen gain
        assert torch.equal(buffer, dict(model.teacher.module.named_buffers())[key]), key


# ---------------------------------------------------------------- the objective


def plain_reference_loss(model, images, student_temp, teacher_temp, teacher_eval):
    """The paper's objective for one view, in float64: the mean over images of
    -sum_k softmax(t / T_t)_k log softmax(s / T_s)_k, with s the student's logits (training mode) and t the
    frozen teacher's (eval mode: its initial BatchNorm statistics; else batch statistics)."""
    student = student_network(model)
    teacher = copy.deepcopy(model.teacher.module)
    teacher.train(not teacher_eval)
    s = student(images) / student_temp
    with torch.no_grad():
        t = teacher(images) / teacher_temp
    total = 0.0
    for n in range(images.shape[0]):
        q = torch.exp(t[n] - t[n].max())
        q = q / q.sum()
        log_p = s[n] - s[n].max() - torch.log(torch.exp(s[n] - s[n].max()).sum())
        total = total - (q * log_p).sum()
    return total / images.shape[0]


@pytest.mark.parametrize("teacher_eval,alpha", [(True, 0.0), (False, 0.5)])
def test_loss_and_gradients_equal_a_float64_reference_of_the_papers_objective(teacher_eval, alpha):
    torch.manual_seed(0)
    model = tiny_random_teachers(student_temp=0.5, teacher_temp=0.2, teacher_eval=teacher_eval, student_init_alpha=alpha)
    model.configure_model()
    reference = copy.deepcopy(model).double()
    batch = next(iter(one_view_loader()))

    out = model.shared_step(batch)
    out["loss"].backward()
    expected = plain_reference_loss(reference, batch["views"][0].double(), 0.5, 0.2, teacher_eval)
    expected.backward()

    torch.testing.assert_close(out["loss"].double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["feats"], model.backbone(batch["views"][0]), rtol=1e-5, atol=1e-6)
    grads = {n: p.grad for n, p in student_network(model).named_parameters() if p.grad is not None}
    reference_grads = {n: p.grad for n, p in student_network(reference).named_parameters() if p.grad is not None}
    assert grads.keys() == reference_grads.keys() and "0.conv1.weight" in grads
    largest = max(float(g.abs().max()) for g in reference_grads.values())
    assert largest > 0  # a learning signal, also from a student that starts at the teacher (eval-mode teacher)
    for name, grad in grads.items():
        torch.testing.assert_close(grad.double(), reference_grads[name], rtol=1e-4, atol=1e-5 * largest, msg=name)
    assert all(p.grad is None for p in model.teacher.parameters())


# ---------------------------------------------------------------- kNN of the student and its teacher


def test_the_frozen_teachers_knn_accuracy_is_reported_beside_the_students():
    torch.manual_seed(0)
    data = Digits(batch_size=256, num_workers=0, views="none", image_size=16, seed=0)
    report, without_baselines = KNNReport(k=20), KNNReport(k=20, baselines=False)
    model = tiny_method(RandomTeachers, optimizer="adamw", lr=1e-3)
    quick_trainer(max_steps=2, limit_val_batches=0, callbacks=[report, without_baselines]).fit(model, data)

    assert list(report.results) == ["trained backbone", "frozen teacher", "random init (seed 0)", "raw pixels"]
    assert without_baselines.results == {name: report.results[name] for name in ("trained backbone", "frozen teacher")}
    queries_loader, bank_loader = data.val_dataloader()

    @torch.no_grad()
    def encode(network, loader):
        network.eval()
        rows = [(network(batch["views"][0]), batch["label"]) for batch in loader]
        return torch.cat([f for f, _ in rows]), torch.cat([y for _, y in rows])

    queries, query_labels = encode(model.teacher.module[0], queries_loader)
    bank, bank_labels = encode(model.teacher.module[0], bank_loader)
    expected = knn_accuracy(queries, query_labels, bank, bank_labels, k=20, temperature=0.1)["top1"]
    assert report.results["frozen teacher"] == pytest.approx(expected)


# ---------------------------------------------------------------- bad input


def test_a_view_recipe_with_two_views_is_rejected_before_training():
    model = tiny_random_teachers()
    with pytest.raises(ValueError, match="RandomTeachers needs 1 view per image, but the DataModule's view recipe makes 2"):
        quick_trainer(fast_dev_run=1).fit(model, Digits(batch_size=32, num_workers=0, views="simclr"))


@pytest.mark.parametrize("kwargs,message", [
    ({"student_init": "nearby"}, "unknown student_init 'nearby'; valid values are close, independent"),
    ({"student_init_alpha": 1.5}, r"student_init_alpha must be in \[0, 1\]"),
    ({"student_init": "independent", "student_init_alpha": 0.1}, "student_init_alpha applies to student_init='close' only"),
    ({"teacher_temp": 0.0}, "needs temperatures > 0"),
])
def test_bad_options_name_what_is_wrong(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_random_teachers(**kwargs)
