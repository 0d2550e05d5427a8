"""What Mixed Barlow Twins promises beyond Barlow Twins: the images are mixed with the very
permutation and lambda that its regulariser uses, the mixed images' projections are the ones
regularised, and it trains."""

import math

import torch

import ssl_lightning.methods.ssl.mixed_barlow_twins as mixed_module
from ssl_lightning.losses.mixed_barlow_twins import mixed_barlow_twins_regulariser
from ssl_lightning.methods.ssl.mixed_barlow_twins import MixedBarlowTwins

from helpers.fakes import fake_loader, quick_trainer, tiny_method


def test_images_are_mixed_with_the_permutation_and_lambda_of_the_loss(monkeypatch):
    model = tiny_method(MixedBarlowTwins, in_chans=1, num_classes=4, batch_size=8)
    model.configure_model()
    images, projections, loss_calls = [], [], []
    # Each step the backbone, then the projector, runs on view 1, view 2 and the mixed images.
    model.backbone.register_forward_pre_hook(lambda module, inputs: images.append(inputs[0].detach().clone()))
    model.projector.register_forward_hook(lambda module, inputs, output: projections.append(output.detach().clone()))

    def recording_regulariser(z1, z2, z_mixed, perm, mix_ratio):
        loss_calls.append((z_mixed.detach().clone(), perm.clone(), mix_ratio))
        return mixed_barlow_twins_regulariser(z1, z2, z_mixed, perm, mix_ratio)

    monkeypatch.setattr(mixed_module, "mixed_barlow_twins_regulariser", recording_regulariser)
    quick_trainer(max_steps=3, limit_val_batches=0).fit(model, fake_loader(batch_size=8, length=64))

    assert len(loss_calls) == 3 and len(images) == 9
    ratios = set()
    for step, (z_mixed, perm, mix_ratio) in enumerate(loss_calls):
        view1, view2, mixed = images[3 * step : 3 * step + 3]
        assert sorted(perm.tolist()) == list(range(8))
        assert 0.0 <= mix_ratio <= 1.0
        torch.testing.assert_close(mixed, mix_ratio * view1 + (1 - mix_ratio) * view2[perm])
        torch.testing.assert_close(z_mixed, projections[3 * step + 2])
        ratios.add(mix_ratio)
    assert len(ratios) == 3  # a fresh lambda every step


def test_short_fit_logs_both_terms_and_updates_the_weights():
    model = tiny_method(MixedBarlowTwins, in_chans=1, num_classes=4, batch_size=8, reg_scale=4.0,
                        optimizer="adamw", lr=1e-3)
    model.configure_model()
    before = [p.detach().clone() for p in model.projector.parameters()]
    trainer = quick_trainer(max_steps=4, limit_val_batches=0, log_every_n_steps=1)
    trainer.fit(model, fake_loader(batch_size=8, length=64))

    metrics = trainer.callback_metrics
    for name in ("train/loss", "train/loss/barlow_twins", "train/loss/mixup"):
        assert math.isfinite(float(metrics[name])), name
    expected = float(metrics["train/loss/barlow_twins"]) + 4.0 * model.lambda_offdiag * float(metrics["train/loss/mixup"])
    assert math.isclose(float(metrics["train/loss"]), expected, rel_tol=1e-4)
    assert any(not torch.equal(b, p) for b, p in zip(before, model.projector.parameters()))


def test_projector_depth_is_configurable_for_the_cifar_recipe():
    model = tiny_method(MixedBarlowTwins, in_chans=1, num_classes=4, batch_size=8, proj_num_layers=2)
    model.configure_model()
    linears = [m for m in model.projector if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 2
