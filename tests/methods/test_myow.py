"""What MYOW promises beyond BYOL: the official ramp of the mined-view weight, the loss weighting
it drives, a teacher over both projectors, and a clear error for bad schedule arguments."""

import math

import pytest
import torch

from ssl_lightning.datamodules import Digits
from ssl_lightning.methods.ssl.myow import MYOW, mined_loss_weight

from helpers.fakes import fake_loader, quick_trainer, tiny_method


def official_weight(step, warmup_steps, rampup_steps, max_weight):
    """MYOWTrainer.update_mined_loss_weight of github.com/nerdslab/myow, as written there."""
    if step < warmup_steps:
        return 0.0
    elif step > rampup_steps:
        return max_weight
    return max_weight * (step - warmup_steps) / (rampup_steps - warmup_steps)


@pytest.mark.parametrize("warmup, rampup, max_weight", [(0, 10, 1.0), (3, 7, 0.5), (100, 110, 1.0), (2, 30, 2.0)])
def test_weight_follows_the_official_ramp(warmup, rampup, max_weight):
    for step in range(rampup + 5):
        assert mined_loss_weight(step, warmup, rampup, max_weight) == pytest.approx(
            official_weight(step, warmup, rampup, max_weight), abs=1e-15
        )


def test_a_ramp_of_no_length_jumps_to_the_final_weight():
    assert [mined_loss_weight(step, 2, 2, 1.0) for step in range(4)] == [0.0, 0.0, 1.0, 1.0]


def test_each_step_weights_byol_and_the_mined_loss_by_the_ramp():
    # 8 steps per epoch: 0.25 epochs of warm-up (2 steps), the ramp ends at 0.75 epochs (step 6).
    model = tiny_method(MYOW, in_chans=1, num_classes=4, batch_size=8, myow_warmup_epochs=0.25, myow_rampup_epochs=0.75)
    outputs = []
    shared_step = model.shared_step
    model.shared_step = lambda batch: outputs.append(shared_step(batch)) or outputs[-1]

    quick_trainer(max_steps=8, limit_val_batches=0).fit(model, fake_loader(batch_size=8, length=64))

    assert (model.warmup_steps, model.rampup_end_step) == (2, 6)
    for step, out in enumerate(outputs):
        weight = official_weight(step, 2, 6, 1.0)
        expected = (out["loss/byol"] + weight * out["loss/mined"]) / (1 + weight)
        torch.testing.assert_close(out["loss"], expected)
        assert math.isfinite(out["loss/mined"].item())


def test_teacher_follows_the_backbone_and_both_projectors():
    model = tiny_method(MYOW, in_chans=1, num_classes=10, batch_size=32)
    quick_trainer(max_steps=3).fit(model, Digits(batch_size=32, num_workers=0))
    student = model._online_network()
    online = {id(p) for p in (*model.backbone.parameters(), *model.projector.parameters(),
                              *model.projector_m.parameters())}
    assert {id(p) for p in student.parameters()} == online
    assert not any(p.requires_grad for p in model.teacher.parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize(
    "kwargs, match",
    [({"mined_k": 0}, "mined_k >= 1"),
     ({"myow_warmup_epochs": 10, "myow_rampup_epochs": 5}, "myow_warmup_epochs <= myow_rampup_epochs"),
     ({"myow_max_weight": -1.0}, "myow_max_weight >= 0")],
)
def test_bad_arguments_fail_with_a_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_method(MYOW, **kwargs)
