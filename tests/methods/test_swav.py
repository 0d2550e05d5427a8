"""What SwAV promises beyond its family: the prototypes stay frozen through the first epoch and
are unit vectors at every forward pass, the queue joins the Sinkhorn batch only from
``epoch_queue_starts``, and multi-crop views train (codes from the global crops only)."""

import lightning as L
import pytest
import torch

from ssl_lightning.datamodules import Digits
from ssl_lightning.methods.ssl import swav
from ssl_lightning.methods.ssl.swav import SwAV

from helpers.fakes import fake_loader, quick_trainer, tiny_method


def tiny_swav(**kwargs):
    defaults = {"in_chans": 1, "num_classes": 4, "batch_size": 8, "num_prototypes": 10, "optimizer": "sgd",
                "lr": 0.5, "warmup_epochs": 0.0}
    return tiny_method(SwAV, **{**defaults, **kwargs})


class WeightsAtEpochEnd(L.Callback):
    def __init__(self):
        self.prototypes, self.projector = [], []

    def on_train_epoch_end(self, trainer, module):
        self.prototypes.append(module.prototypes.weight.detach().clone())
        self.projector.append(module.projector[0].weight.detach().clone())


def test_prototypes_are_frozen_through_the_first_epoch_only():
    model = tiny_swav(freeze_prototypes_epochs=1)
    model.configure_model()
    initial_prototypes = model.prototypes.weight.detach().clone()
    initial_projector = model.projector[0].weight.detach().clone()
    weights = WeightsAtEpochEnd()

    trainer = quick_trainer(max_epochs=2, limit_val_batches=0, callbacks=[weights])
    trainer.fit(model, fake_loader(batch_size=8, length=32))

    # epoch 0: only the per-step renormalisation of (already) unit rows touches the prototypes
    torch.testing.assert_close(weights.prototypes[0], initial_prototypes, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(weights.projector[0], initial_projector)
    assert not torch.allclose(weights.prototypes[1], weights.prototypes[0], rtol=1e-4, atol=1e-5)


def test_prototypes_are_unit_vectors_at_every_forward_pass():
    model = tiny_swav(freeze_prototypes_epochs=0)
    model.configure_model()
    norms = []
    model.prototypes.register_forward_pre_hook(lambda module, inputs: norms.append(module.weight.detach().norm(dim=1)))
    before = model.prototypes.weight.detach().clone()

    quick_trainer(max_steps=4, limit_val_batches=0).fit(model, fake_loader(batch_size=8, length=64))

    assert len(norms) == 4
    for norm in norms:
        torch.testing.assert_close(norm, torch.ones(10), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(model.prototypes.weight, before)  # they do train once unfrozen


def test_queue_joins_the_sinkhorn_batch_from_epoch_queue_starts(monkeypatch):
    sizes = []
    sinkhorn = swav.sinkhorn_knopp

    def spy(scores, *args):
        sizes.append(scores.shape[0])
        return sinkhorn(scores, *args)

    monkeypatch.setattr(swav, "sinkhorn_knopp", spy)
    model = tiny_swav(queue_size=32, epoch_queue_starts=2)
    # 4 steps of 8 images an epoch: the 32-row queue holds real projections from epoch 1 on
    quick_trainer(max_epochs=3, limit_val_batches=0).fit(model, fake_loader(batch_size=8, length=32))

    per_epoch = 4 * 2  # steps x global crops
    assert sizes == [8] * 2 * per_epoch + [32 + 8] * per_epoch


def test_queue_holds_both_global_crops_projections_side_by_side():
    model = tiny_swav(queue_size=32)
    model.configure_model()
    projections = []
    model.projector.register_forward_hook(lambda module, inputs, output: projections.append(output.detach()))

    quick_trainer(max_steps=1, limit_val_batches=0).fit(model, fake_loader(batch_size=8, length=32))

    unit = torch.nn.functional.normalize(projections[0], dim=1)  # both crops, one projector pass
    torch.testing.assert_close(model.queue.features[:8], torch.cat([unit[:8], unit[8:]], dim=1))
    assert int(model.queue.position) == 8


def test_multi_crop_views_train():
    model = tiny_method(SwAV, in_chans=1, num_classes=10, batch_size=32, num_prototypes=20, optimizer="sgd", lr=0.1)
    trainer = quick_trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(model, Digits(batch_size=32, num_workers=0, views="dino"))  # 2 global + 6 local crops
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_a_queue_that_does_not_fit_the_data_fails_at_fit_start():
    model = tiny_method(SwAV, queue_size=48, in_chans=1, num_classes=10, batch_size=32)
    with pytest.raises(ValueError, match="SwAV: the queue size 48 is not divisible by the global batch 32"):
        quick_trainer(max_steps=1).fit(model, Digits(batch_size=32, num_workers=0))


def test_a_queue_used_from_epoch_zero_is_refused():
    with pytest.raises(ValueError, match="epoch_queue_starts >= 1.*epoch_queue_starts=0"):
        SwAV(queue_size=64, epoch_queue_starts=0)
