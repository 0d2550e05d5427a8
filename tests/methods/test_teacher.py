import math

import lightning as L
import pytest
import torch
from torch import nn

from ssl_lightning.components import EMATeacher
from ssl_lightning.methods import BYOL

from helpers.fakes import TINY_BACKBONE, fake_loader


def small_net():
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))


def byol_momentum(k, total, base):
    """BYOL's target decay rate, written as in the paper (section 3.2)."""
    return 1 - (1 - base) * (math.cos(math.pi * k / total) + 1) / 2


def test_update_is_ema_of_float_tensors_and_copy_of_integer_buffers():
    student = small_net()
    teacher = EMATeacher(student, base_momentum=0.9)
    before = {k: v.clone() for k, v in teacher.module.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    student(torch.randn(8, 4))  # moves BN running stats and num_batches_tracked
    teacher.update(student, momentum=0.75)
    for key, value in teacher.module.state_dict().items():
        s = student.state_dict()[key]
        if value.is_floating_point():
            torch.testing.assert_close(value, 0.75 * before[key] + 0.25 * s)
        else:
            assert torch.equal(value, s)
    assert not any(p.requires_grad for p in teacher.parameters())


def test_forward_uses_batch_statistics_and_keeps_running_statistics():
    teacher = EMATeacher(small_net())
    teacher.eval()  # even in eval mode the teacher normalises with batch statistics
    bn = teacher.module[1]
    running = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    x = torch.randn(16, 4) * 3 + 2
    out = teacher(x)
    hidden = teacher.module[0](x)
    expected_bn = (hidden - hidden.mean(0)) / torch.sqrt(hidden.var(0, unbiased=False) + bn.eps) * bn.weight + bn.bias
    torch.testing.assert_close(out, teacher.module[3](torch.relu(expected_bn)))
    assert torch.equal(bn.running_mean, running[0]) and torch.equal(bn.running_var, running[1])
    assert torch.equal(bn.num_batches_tracked, running[2])
    assert not out.requires_grad
    assert not bn.training and bn.track_running_stats  # the flags are restored


def test_frozen_teacher_never_moves():
    student = small_net()
    teacher = EMATeacher(student, frozen=True)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    with torch.no_grad():
        student[0].weight.add_(1.0)
    teacher.update(student, momentum=0.0)
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())


def test_frozen_teacher_from_a_state_dict():
    trained = small_net()
    teacher = EMATeacher(small_net(), frozen=True)
    teacher.load_teacher_state(trained.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(teacher.module.state_dict().values(), trained.state_dict().values()))


def test_momentum_range_is_validated():
    with pytest.raises(ValueError, match="base_momentum <= final_momentum"):
        EMATeacher(small_net(), base_momentum=0.99, final_momentum=0.9)


class RecordStudentAfterEachOptimizerStep(L.Callback):
    def on_train_start(self, trainer, pl_module):
        self.initial = {k: v.clone() for k, v in pl_module._online_network().state_dict().items()}
        self.after_step, self.last_step = [], 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self.last_step:
            self.last_step = trainer.global_step
            self.after_step.append({k: v.clone() for k, v in pl_module._online_network().state_dict().items()})


def test_teacher_in_a_byol_fit_with_gradient_accumulation_equals_closed_form_ema(tmp_path):
    torch.manual_seed(0)
    model = BYOL(**TINY_BACKBONE, in_chans=1, num_classes=4, batch_size=8, proj_hidden_dim=16, proj_dim=8,
                 pred_hidden_dim=16, base_momentum=0.9, optimizer="sgd", lr=0.5)
    recorder = RecordStudentAfterEachOptimizerStep()
    trainer = L.Trainer(max_epochs=3, accumulate_grad_batches=2, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[recorder])
    trainer.fit(model, fake_loader(batch_size=8, length=32))

    total = trainer.estimated_stepping_batches
    assert total == 6 and len(recorder.after_step) == 6  # 4 micro-batches per epoch, 2 per step
    expected = recorder.initial
    for k, student in enumerate(recorder.after_step):
        m = byol_momentum(k, total, 0.9)
        expected = {key: m * value + (1 - m) * student[key] if value.is_floating_point() else student[key]
                    for key, value in expected.items()}
    got = model.teacher.module.state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)

    path = tmp_path / "byol.ckpt"
    trainer.save_checkpoint(path)
    assert torch.load(path, weights_only=True)["state_dict"]  # loadable without unpickling code
    restored = BYOL.load_from_checkpoint(path, weights_only=True)
    for key, value in model.teacher.state_dict().items():
        assert torch.equal(restored.teacher.state_dict()[key], value), key
