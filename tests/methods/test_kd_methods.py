"""KD, DKD and NKD as methods: the frozen teacher (unchanged by a fit, always in eval mode, fed the
student's view), its sources (our checkpoint, a timm model with a weights file, an exported backbone
with a head file, a module in Python), checkpoints without it by default and resume, which weight
multiplies which term, unlabelled rows, and the errors for a wrong teacher."""

import shutil
from types import SimpleNamespace

import lightning as L
import pytest
import timm
import torch
from safetensors.torch import save_file

from ssl_lightning.components.frozen_teacher import FrozenTeacher
from ssl_lightning.export import export_backbone
from ssl_lightning.losses import labelled_cross_entropy
from ssl_lightning.losses.dkd import decoupled_kd_terms
from ssl_lightning.losses.kd import kd_loss
from ssl_lightning.losses.nkd import nkd_terms
from ssl_lightning.methods import Classifier, SimCLR
from ssl_lightning.methods.supervised.dkd import DKD, dkd_warmup
from ssl_lightning.methods.supervised.kd import KD
from ssl_lightning.methods.supervised.nkd import NKD

from helpers.fakes import SMALL_HEADS, TINY_BACKBONE, fake_loader, quick_trainer

STUDENTS = {"KD": KD, "DKD": DKD, "NKD": NKD}
#: the tiny ResNet of TINY_BACKBONE, as timm builds it with its classifier
TINY_TIMM = {"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64]}


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    """A tiny Classifier (1 channel, 4 classes) trained for two steps, as `fit` saves it."""
    torch.manual_seed(0)
    teacher = Classifier(**TINY_BACKBONE, in_chans=1, num_classes=4, batch_size=8, optimizer="adamw", lr=1e-2)
    trainer = quick_trainer(max_steps=2)
    trainer.fit(teacher, fake_loader(size=16))
    path = tmp_path_factory.mktemp("teacher") / "teacher.ckpt"
    trainer.save_checkpoint(path)
    return path


def reference_teacher(path) -> Classifier:
    return Classifier.load_from_checkpoint(path, weights_only=True).eval()


def student(name, teacher_ckpt=None, **kwargs):
    source = {"teacher_ckpt": str(teacher_ckpt)} if teacher_ckpt is not None else {}
    return STUDENTS[name](**TINY_BACKBONE, in_chans=1, num_classes=4, batch_size=8, **{**source, **kwargs})


def loaded_student(name, teacher_ckpt, **kwargs):
    model = student(name, teacher_ckpt, **kwargs)
    model.configure_model()
    model.teacher.load(num_classes=4, in_chans=1)
    return model


def batch(labels=None):
    data = next(iter(fake_loader(size=16)))
    return data if labels is None else {**data, "label": torch.tensor(labels)}


# ----------------------------------------------------------------- the frozen teacher
class RecordTeacherModes(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.modes = {module.training for module in pl_module.teacher.modules()}
        self.student_training = pl_module.backbone.training


@pytest.mark.parametrize("name", list(STUDENTS))
def test_the_teacher_is_bit_identical_after_a_fit_in_eval_mode_and_outside_the_optimizer(name, teacher_ckpt):
    model = student(name, teacher_ckpt, optimizer="adamw", lr=1e-2)
    model.configure_model()
    initial_head = model.head.weight.detach().clone()
    modes = RecordTeacherModes()
    trainer = quick_trainer(max_steps=3, callbacks=[modes])
    trainer.fit(model, fake_loader(size=16))
    source = reference_teacher(teacher_ckpt)
    expected = {**{f"backbone.{k}": v for k, v in source.backbone.state_dict().items()},
                **{f"head.{k}": v for k, v in source.head.state_dict().items()}}
    teacher_state = model.teacher.model.state_dict()  # parameters and BatchNorm buffers
    assert teacher_state.keys() == expected.keys()
    assert all(torch.equal(teacher_state[key], value) for key, value in expected.items())
    assert modes.modes == {False} and modes.student_training  # eval while the student trains
    assert not any(p.requires_grad for p in model.teacher.parameters())
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in model.teacher.parameters()}
    assert not torch.equal(model.head.weight, initial_head)  # the student did train


def test_train_mode_leaves_the_teacher_in_eval_mode(teacher_ckpt):
    model = loaded_student("KD", teacher_ckpt)
    model.train()
    assert model.backbone.training and not any(module.training for module in model.teacher.modules())


@pytest.mark.parametrize("name", list(STUDENTS))
def test_the_teacher_sees_the_students_view_and_gives_its_logits_without_gradient(name, teacher_ckpt):
    model = loaded_student(name, teacher_ckpt)
    seen = {}
    model.teacher.model.register_forward_hook(lambda module, args, out: seen.update(images=args[0], logits=out))
    data = batch()
    model.shared_step(data)
    assert seen["images"] is data["views"][0]
    assert not seen["logits"].requires_grad
    with torch.no_grad():
        torch.testing.assert_close(seen["logits"], reference_teacher(teacher_ckpt)(data["views"][0]))


# ----------------------------------------------------------------- which weight multiplies which term
def test_each_loss_combines_its_terms_with_its_weights(teacher_ckpt):
    data = batch([0, 1, -1, 3, 2, -1, 1, 0])
    images, labels = data["views"][0], data["label"]
    for name, kwargs in (("KD", {"temperature": 3.0, "ce_weight": 0.3, "kd_weight": 0.7}),
                         ("DKD", {"alpha": 2.0, "beta": 5.0, "temperature": 3.0, "ce_weight": 0.5}),
                         ("NKD", {"temperature": 2.0, "gamma": 2.5, "ce_weight": 0.5})):
        model = loaded_student(name, teacher_ckpt, **kwargs)
        if name == "DKD":
            model._trainer = SimpleNamespace(current_epoch=3)  # the 4th epoch of mdistiller's 1-based count
        out = model.shared_step(data)
        logits, teacher_logits = model(images), model.teacher(images)
        ce = labelled_cross_entropy(logits, labels)
        if name == "KD":
            expected, terms = 0.3 * ce + 0.7 * kd_loss(logits, teacher_logits, 3.0), {"ce", "kd"}
        elif name == "DKD":
            tckd, nckd = decoupled_kd_terms(logits, teacher_logits, labels, 3.0)
            expected, terms = 0.5 * ce + 4 / 20 * (2.0 * tckd + 5.0 * nckd), {"ce", "tckd", "nckd"}
        else:
            target, non_target = nkd_terms(logits, teacher_logits, labels, 2.0)
            expected, terms = 0.5 * ce + target + 2.5 * non_target, {"ce", "target", "non_target"}
        torch.testing.assert_close(out["loss"], expected, rtol=1e-6, atol=1e-7)
        assert {key[5:] for key in out if key.startswith("loss/")} == terms
        assert out["logits"].shape == (8, 4) and out["feats"].shape == (8, 64)


def test_dkd_warms_up_linearly_over_its_first_20_epochs_as_mdistiller():
    # mdistiller: min(epoch / 20, 1) with epochs counted from 1; Lightning counts from 0.
    assert [dkd_warmup(epoch, 20) for epoch in (0, 1, 9, 18, 19, 20, 239)] == [0.05, 0.1, 0.5, 0.95, 1.0, 1.0, 1.0]
    assert dkd_warmup(0, 0) == 1.0


def test_kd_at_kd_weight_zero_is_the_classifier_baseline_exactly(teacher_ckpt):
    data = batch([0, 1, -1, 3, 2, 1, 1, 0])
    kd = loaded_student("KD", teacher_ckpt, ce_weight=1.0, kd_weight=0.0)
    baseline = Classifier(**TINY_BACKBONE, in_chans=1, num_classes=4, batch_size=8)
    baseline.configure_model()
    baseline.load_state_dict({k: v for k, v in kd.state_dict().items() if not k.startswith("teacher.")})
    losses, grads = [], []
    for model in (kd, baseline):
        loss = model.shared_step(data)["loss"]
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, list(model.backbone.parameters()) + list(model.head.parameters())))
    assert torch.equal(losses[0], losses[1])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_unlabelled_rows_still_learn_from_the_teacher_in_kd_but_not_in_dkd_and_nkd(teacher_ckpt):
    data = batch([-1] * 8)
    for name in STUDENTS:
        model = loaded_student(name, teacher_ckpt)
        out = model.shared_step(data)
        grads = torch.autograd.grad(out["loss"], list(model.head.parameters()))
        if name == "KD":  # the KD term needs no label; the cross-entropy masks the rows
            assert out["loss/ce"].item() == 0.0 and out["loss/kd"].item() > 0
            assert out["loss"].item() == pytest.approx(0.9 * out["loss/kd"].item())
            assert any(g.abs().sum() > 0 for g in grads)
        else:  # DKD's and NKD's terms need the target class
            assert out["loss"].item() == 0.0 and all(torch.count_nonzero(g) == 0 for g in grads)


# ----------------------------------------------------------------- checkpoints and resume
def fit_and_save(model, path, steps=2, ckpt_path=None):
    trainer = quick_trainer(max_steps=steps)
    # One batch per epoch: a plain DataLoader cannot resume mid-epoch, and here every epoch is one step.
    trainer.fit(model, fake_loader(size=16, length=8), ckpt_path=ckpt_path)
    trainer.save_checkpoint(path)
    return trainer


@pytest.mark.parametrize("save_teacher", [False, True])
def test_the_teacher_is_left_out_of_checkpoints_unless_asked_and_they_load_strictly(save_teacher, teacher_ckpt,
                                                                                    tmp_path):
    model = student("NKD", teacher_ckpt, save_teacher=save_teacher)
    fit_and_save(model, tmp_path / "student.ckpt")
    saved = torch.load(tmp_path / "student.ckpt", weights_only=True)
    teacher_keys = {key for key in saved["state_dict"] if key.startswith("teacher.")}
    weights = {f"teacher.model.{key}" for key in model.teacher.model.state_dict()}
    assert teacher_keys == ({"teacher._extra_state"} | (weights if save_teacher else set()))
    assert saved["state_dict"]["teacher._extra_state"].shape == (32,)  # the fingerprint
    assert "teacher" not in saved["hyper_parameters"]  # a Python module never enters the hyperparameters
    restored = NKD.load_from_checkpoint(tmp_path / "student.ckpt", weights_only=True)  # strict: no teacher needed
    assert not restored.teacher.loaded
    assert all(torch.equal(restored.state_dict()[key], value) for key, value in model.state_dict().items()
               if not key.startswith("teacher.model."))
    # a loaded teacher takes a student checkpoint strictly too, with or without its weights
    fresh = loaded_student("NKD", teacher_ckpt, save_teacher=save_teacher)
    fresh.load_state_dict(saved["state_dict"], strict=True)
    assert torch.equal(fresh.head.weight, model.head.weight)


@pytest.mark.parametrize("name", list(STUDENTS))
def test_resume_reloads_the_teacher_and_continues_as_one_fit(name, teacher_ckpt, tmp_path):
    # A constant LR, so that the 2-step fit's schedule is the 4-step fit's. Equal weights after 4 steps
    # need the same teacher after the resume (and DKD the same epochs for its warm-up).
    def fresh():
        torch.manual_seed(1)
        model = student(name, teacher_ckpt, optimizer="adamw", lr=1e-2, schedule="constant")
        model.configure_model()
        return model

    fit_and_save(fresh(), tmp_path / "half.ckpt", steps=2)
    resumed = student(name, teacher_ckpt, optimizer="adamw", lr=1e-2, schedule="constant")
    trainer = fit_and_save(resumed, tmp_path / "end.ckpt", steps=4, ckpt_path=tmp_path / "half.ckpt")
    assert trainer.global_step == 4 and resumed.teacher.loaded
    straight = fresh()
    fit_and_save(straight, tmp_path / "straight.ckpt", steps=4)
    for key, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_resume_with_another_teacher_at_the_source_stops(teacher_ckpt, tmp_path):
    source = tmp_path / "teacher.ckpt"
    shutil.copy(teacher_ckpt, source)
    fit_and_save(student("KD", source), tmp_path / "half.ckpt")
    changed = torch.load(source, weights_only=True)
    changed["state_dict"]["head.bias"] += 1.0  # the teacher was retrained in place
    torch.save(changed, source)
    with pytest.raises(ValueError, match=r"KD: the teacher loaded from teacher_ckpt=.*teacher.ckpt is not the teacher "
                                         r"this checkpoint was trained with \(weight fingerprints \w+ and \w+ differ\)"):
        quick_trainer(max_steps=4).fit(student("KD", source), fake_loader(size=16, length=8), ckpt_path=tmp_path / "half.ckpt")


def test_a_saved_teacher_wins_over_a_changed_source_on_resume(teacher_ckpt, tmp_path):
    source = tmp_path / "teacher.ckpt"
    shutil.copy(teacher_ckpt, source)
    fit_and_save(student("KD", source, save_teacher=True), tmp_path / "half.ckpt")
    changed = torch.load(source, weights_only=True)
    changed["state_dict"]["head.bias"] += 1.0
    torch.save(changed, source)
    resumed = student("KD", source, save_teacher=True, lr=0.0)
    quick_trainer(max_steps=3).fit(resumed, fake_loader(size=16, length=8), ckpt_path=tmp_path / "half.ckpt")
    assert torch.equal(resumed.teacher.model.head.bias, reference_teacher(teacher_ckpt).head.bias)


# ----------------------------------------------------------------- teacher sources
def assert_teacher_gives(model, reference):
    images = batch()["views"][0]
    with torch.no_grad():
        torch.testing.assert_close(model.teacher(images), reference.eval()(images))


def tiny_timm(**kwargs):
    torch.manual_seed(2)
    return timm.create_model("resnet18", num_classes=4, in_chans=1, **{**TINY_TIMM, **kwargs}).eval()


@pytest.mark.parametrize("file_format", ["pth", "safetensors"])
def test_a_timm_teacher_from_a_local_weights_file(file_format, tmp_path):
    reference = tiny_timm()
    path = tmp_path / f"teacher.{file_format}"
    if file_format == "pth":  # a training script's checkpoint: wrapped, DataParallel prefix
        torch.save({"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}, "epoch": 3}, path)
    else:
        save_file(reference.state_dict(), str(path))
    model = loaded_student("KD", None, teacher_timm="resnet18", teacher_weights=str(path), teacher_timm_kwargs=TINY_TIMM)
    assert model.teacher.num_classes == 4  # read from the weights' classifier ("fc")
    assert_teacher_gives(model, reference)


def test_a_teacher_from_an_exported_backbone_and_a_head_file(teacher_ckpt, tmp_path):
    export_backbone(teacher_ckpt, tmp_path / "backbone.safetensors")
    state = torch.load(teacher_ckpt, weights_only=True)["state_dict"]
    save_file({k: v for k, v in state.items() if k.startswith("head.")}, str(tmp_path / "head.safetensors"))
    model = loaded_student("DKD", tmp_path / "backbone.safetensors", teacher_head=str(tmp_path / "head.safetensors"))
    assert_teacher_gives(model, reference_teacher(teacher_ckpt))


def test_a_teacher_module_given_in_python_is_frozen_and_not_saved(tmp_path):
    reference = tiny_timm()
    model = student("NKD", teacher=reference)
    model.configure_model()
    assert "teacher" not in model.hparams and not any(p.requires_grad for p in reference.parameters())
    model.shared_step(batch())  # ready without a Trainer
    fit_and_save(model, tmp_path / "student.ckpt")
    restored = NKD.load_from_checkpoint(tmp_path / "student.ckpt", weights_only=True, teacher=tiny_timm())
    assert_teacher_gives(restored, reference)


# ----------------------------------------------------------------- bad input
def test_a_teacher_with_another_class_count_names_both_numbers(teacher_ckpt):
    model = STUDENTS["KD"](**TINY_BACKBONE, teacher_ckpt=str(teacher_ckpt), in_chans=1, num_classes=5, batch_size=8)
    with pytest.raises(ValueError, match=r"KD: the teacher \(teacher_ckpt=.*\) predicts 4 classes, but the data has 5"):
        quick_trainer(max_steps=1).fit(model, fake_loader(size=16, num_classes=5))


def test_a_timm_teacher_of_another_architecture_names_the_mismatched_keys(tmp_path):
    path = tmp_path / "deeper.pth"
    torch.save(tiny_timm(layers=[2, 1, 1, 1], channels=[16, 16, 32, 64]).state_dict(), path)
    with pytest.raises(ValueError, match=r"teacher weights in teacher_weights=.*deeper.pth do not fit timm's resnet18 "
                                         r".*another architecture: unexpected \(\d+\): layer1\.1\.conv1\.weight.*; "
                                         r"other shape, file vs model \(\d+\): layer1\.0\.conv1\.weight \(16, 64, 3, 3\) "
                                         r"vs \(8, 64, 3, 3\)"):
        loaded_student("KD", None, teacher_timm="resnet18", teacher_weights=str(path), teacher_timm_kwargs=TINY_TIMM)


def test_a_checkpoint_whose_backbone_does_not_fit_its_hyperparameters_names_the_missing_keys(teacher_ckpt, tmp_path):
    checkpoint = torch.load(teacher_ckpt, weights_only=True)
    checkpoint["hyper_parameters"]["backbone_kwargs"] = {**TINY_TIMM, "layers": [2, 1, 1, 1]}
    torch.save(checkpoint, tmp_path / "edited.ckpt")
    with pytest.raises(ValueError, match=r"do not fit resnet18 \(the backbone its hyperparameters describe\), another "
                                         r"architecture: missing \(\d+\): layer1\.1\.conv1\.weight"):
        loaded_student("KD", tmp_path / "edited.ckpt")


def test_a_self_supervised_checkpoint_is_refused_as_not_a_classifier(tmp_path):
    simclr = SimCLR(**TINY_BACKBONE, **SMALL_HEADS, in_chans=1, num_classes=4, batch_size=8)
    fit_and_save(simclr, tmp_path / "simclr.ckpt", steps=1)
    with pytest.raises(ValueError, match=r"is not a classifier checkpoint: it has no classifier head \('head.weight'; "
                                         r"its modules: backbone, probe, projector\)\. DKD needs a classifier checkpoint"):
        loaded_student("DKD", tmp_path / "simclr.ckpt")


def test_no_teacher_stops_the_fit_and_says_what_to_pass():
    with pytest.raises(ValueError, match=r"NKD needs a teacher, and none was given\. Pass "
                                         r"--model\.init_args\.teacher_ckpt <a Classifier checkpoint>"):
        quick_trainer(max_steps=1).fit(student("NKD"), fake_loader(size=16))


def test_an_exported_backbone_without_a_head_says_that_export_has_none(teacher_ckpt, tmp_path):
    export_backbone(teacher_ckpt, tmp_path / "backbone.safetensors")
    with pytest.raises(ValueError, match="is an exported backbone, and `export` writes the backbone only, without the "
                                         "classifier head. Give teacher_head"):
        loaded_student("KD", tmp_path / "backbone.safetensors")


@pytest.mark.parametrize("arguments,message", [
    ({"teacher_ckpt": "a.ckpt", "teacher_timm": "resnet18", "teacher_weights": "w.pth"},
     "give one teacher source, got teacher_ckpt and teacher_timm"),
    ({"teacher_timm": "resnet18"}, "teacher_timm='resnet18' needs teacher_weights"),
    ({"teacher_weights": "w.pth"}, "teacher_weights='w.pth' are the weights of a timm model: set teacher_timm"),
    ({"teacher_ckpt": "a.ckpt", "teacher_head": "h.pt"}, "teacher_head='h.pt' goes with an exported backbone"),
])
def test_contradictory_teacher_arguments_are_refused_at_construction(arguments, message):
    with pytest.raises(ValueError, match=message):
        FrozenTeacher("KD", **{{"teacher_ckpt": "ckpt", "teacher_timm": "timm_name", "teacher_weights": "weights",
                                 "teacher_head": "head"}[k]: v for k, v in arguments.items()})


def test_a_weights_file_that_is_no_state_dict_is_named(tmp_path):
    path = tmp_path / "object.pth"
    torch.save({"model": SimpleNamespace(weights=1)}, path)  # a pickled object: refused by weights_only=True
    with pytest.raises(ValueError, match=r"teacher_weights=.*object.pth cannot be read with "
                                         r"torch.load\(weights_only=True\)"):
        loaded_student("KD", None, teacher_timm="resnet18", teacher_weights=str(path), teacher_timm_kwargs=TINY_TIMM)


def test_a_teacher_trained_with_another_normalisation_is_warned_about(teacher_ckpt, tmp_path):
    checkpoint = torch.load(teacher_ckpt, weights_only=True)
    checkpoint["data_facts"] = {"in_chans": 1, "image_size": 16, "mean": [0.5], "std": [0.25]}
    torch.save(checkpoint, tmp_path / "with_facts.ckpt")
    model = student("KD", tmp_path / "with_facts.ckpt")
    with pytest.warns(UserWarning, match=r"normalised with mean \[0.5\], but the DataModule .* uses \[0.1\]"):
        model.teacher.load(4, 1, SimpleNamespace(mean=(0.1,), std=(0.25,)))
