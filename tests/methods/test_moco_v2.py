"""What MoCo v2 and MoCHi promise beyond the SSL family: the key encoder is the closed-form EMA of the
query encoder, the queue holds the last keys in FIFO order (never MoCHi's synthetic negatives),
and a queue the global batch does not divide fails at fit start."""

import lightning as L
import pytest
import torch
import torch.nn.functional as F

import ssl_lightning.methods.ssl.mochi as mochi_module
from ssl_lightning.methods.ssl.mochi import MoCHi
from ssl_lightning.methods.ssl.moco_v2 import MoCoV2

from helpers.fakes import TINY_BACKBONE, fake_loader, quick_trainer

SMALL = {**TINY_BACKBONE, "in_chans": 1, "num_classes": 4, "batch_size": 8, "proj_hidden_dim": 16, "proj_dim": 8,
         "queue_size": 64}
SMALL_MOCHI = {"num_hardest": 16, "num_mixed": 8, "num_query_mixed": 4}


class RecordQueryEncoderAfterEachStep(L.Callback):
    def on_train_start(self, trainer, pl_module):
        self.initial = self._state(pl_module)
        self.after_step, self.last_step = [], 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self.last_step:
            self.last_step = trainer.global_step
            self.after_step.append(self._state(pl_module))

    @staticmethod
    def _state(pl_module):
        return {k: v.clone() for k, v in pl_module._online_network().state_dict().items()}


def test_key_encoder_is_the_closed_form_ema_of_the_query_encoder():
    torch.manual_seed(0)
    m = 0.9
    model = MoCoV2(**SMALL, base_momentum=m, final_momentum=m, lr=0.5)
    recorder = RecordQueryEncoderAfterEachStep()
    quick_trainer(max_steps=5, callbacks=[recorder]).fit(model, fake_loader(batch_size=8, length=32))

    steps = len(recorder.after_step)
    assert steps == 5
    got = model.teacher.module.state_dict()
    for key, initial in recorder.initial.items():
        if not initial.is_floating_point():  # num_batches_tracked: copied from the student
            assert torch.equal(got[key], recorder.after_step[-1][key]), key
            continue
        # theta'_K = m^K theta_0 + (1 - m) sum_j m^(K - j) theta_j, theta_j the query encoder after step j
        expected = m**steps * initial + sum((1 - m) * m ** (steps - j) * recorder.after_step[j - 1][key]
                                            for j in range(1, steps + 1))
        torch.testing.assert_close(got[key], expected, rtol=1e-5, atol=1e-6, msg=key)
    assert any(not torch.equal(got[k], recorder.initial[k]) for k in got)  # it moved


class RecordKeys(L.Callback):
    """The queue at the start, and the normalised keys of every batch computed independently: the
    key encoder on each view, before the step (the key encoder moves only after it)."""

    def __init__(self, symmetric: bool):
        self.symmetric = symmetric

    def on_train_start(self, trainer, pl_module):
        self.initial, self.pushed = pl_module.queue.features.clone(), []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        view1, view2 = batch["views"]
        keys = [pl_module.teacher(view1), pl_module.teacher(view2)] if self.symmetric else [pl_module.teacher(view2)]
        self.pushed.append(torch.cat([F.normalize(k, dim=1) for k in keys], dim=1))


def fifo(initial, pushes):
    """The queue written plainly: row r holds the newest key pushed at a position r modulo K."""
    rows, written = list(initial), 0
    for keys in pushes:
        for key in keys:
            rows[written % len(rows)] = key
            written += 1
    return torch.stack(rows)


@pytest.mark.parametrize("method, kwargs", [(MoCoV2, {"symmetric": True}), (MoCoV2, {"symmetric": False}),
                                            (MoCHi, {"symmetric": True, **SMALL_MOCHI})],
                         ids=["symmetric", "asymmetric", "mochi"])
def test_queue_holds_the_last_keys_in_fifo_order_and_no_synthetic_negative(method, kwargs, monkeypatch):
    mixes = []
    original = mochi_module.mix_hard_negatives

    def counting_mix(*args, **kw):
        mixes.append(out := original(*args, **kw))
        return out

    monkeypatch.setattr(mochi_module, "mix_hard_negatives", counting_mix)
    torch.manual_seed(0)
    model = method(**SMALL, **kwargs)
    recorder = RecordKeys(kwargs["symmetric"])
    # 10 steps of 8 keys through 64 rows: the ring wraps
    quick_trainer(max_steps=10, callbacks=[recorder]).fit(model, fake_loader(batch_size=8, length=64))

    assert len(recorder.pushed) == 10
    width = (2 if kwargs["symmetric"] else 1) * SMALL["proj_dim"]
    assert model.queue.features.shape == (64, width)
    torch.testing.assert_close(model.queue.features, fifo(recorder.initial, recorder.pushed), rtol=1e-5, atol=1e-6)
    assert int(model.queue.position) == 80 % 64
    # every view's slice of a row is a unit vector, including the random rows of the start
    torch.testing.assert_close(recorder.initial.unflatten(1, (-1, SMALL["proj_dim"])).norm(dim=2),
                               torch.ones(64, width // SMALL["proj_dim"]))
    # MoCHi did mix (two views a step), and the FIFO equality above shows no mixture reached the queue
    assert len(mixes) == (20 if method is MoCHi else 0)
    if mixes:
        assert mixes[0].shape == (8, SMALL_MOCHI["num_mixed"] + SMALL_MOCHI["num_query_mixed"], SMALL["proj_dim"])


def test_mochi_mixes_from_the_given_epoch(monkeypatch):
    epochs = []
    original = mochi_module.mix_hard_negatives
    model = MoCHi(**SMALL, **SMALL_MOCHI, mix_from_epoch=1)

    def recording_mix(*args, **kw):
        epochs.append(model.current_epoch)
        return original(*args, **kw)

    monkeypatch.setattr(mochi_module, "mix_hard_negatives", recording_mix)
    quick_trainer(max_epochs=2).fit(model, fake_loader(batch_size=8, length=16))
    assert epochs == [1] * 4  # 2 steps of epoch 1, two views each; none in epoch 0


def test_queue_that_the_global_batch_does_not_divide_fails_at_fit_start():
    model = MoCoV2(**{**SMALL, "batch_size": 32, "queue_size": 100})
    with pytest.raises(ValueError, match="MoCoV2: the queue size 100 is not divisible by the global batch 32"):
        quick_trainer(max_steps=1).fit(model, fake_loader(batch_size=32, length=64))


def test_mochi_refuses_more_hardest_negatives_than_the_queue_holds():
    with pytest.raises(ValueError, match="num_hardest=128 and queue_size=64"):
        MoCHi(**SMALL, num_hardest=128)
