"""LSSKD as a method: one backbone pass over the rotated batch feeds the final classifier and the
auxiliary classifiers after the stages, which weight multiplies which term, the auxiliary heads train,
and at inference and export the model is exactly a plain Classifier; short fits that log the terms, a
checkpoint round trip, and the errors for bad arguments."""

import pytest
import torch
from torch import nn

from ssl_lightning.components.rotation import rotate_batch
from ssl_lightning.export import export_backbone
from ssl_lightning.losses.lsskd import lsskd_terms
from ssl_lightning.methods.supervised.classifier import Classifier
from ssl_lightning.methods.supervised.lsskd import LSSKD

from helpers.fakes import TINY_BACKBONE, fake_loader, quick_trainer, tiny_method

SIZES = {"in_chans": 1, "num_classes": 4, "batch_size": 8}


def lsskd(**kwargs):
    torch.manual_seed(0)
    model = tiny_method(LSSKD, **SIZES, **kwargs)
    model.configure_model()
    return model


def batch(labels=None, size=16):
    data = next(iter(fake_loader(size=size, num_views=1)))
    return data if labels is None else {**data, "label": torch.tensor(labels)}


def test_an_auxiliary_classifier_follows_every_stage_by_default_and_the_chosen_ones_otherwise():
    model = lsskd()
    assert [branch[0].in_features for branch in model.aux_features] == [8, 16, 32, 64]
    assert all(c.out_features == 16 and c.in_features == 64 for c in model.aux_classifiers)
    assert model.head.out_features == 4
    chosen = lsskd(stages=[1, -1], aux_hidden_dim=24)
    assert [branch[0].in_features for branch in chosen.aux_features] == [16, 64]
    assert chosen.aux_features[0][0].out_features == 24 and chosen.aux_features[0][-1].out_features == 64


def test_one_backbone_pass_over_the_rotations_and_the_weighted_terms():
    model = lsskd(temperature=2.0, ce_weight=0.5, joint_weight=2.0, kl_weight=3.0, feature_weight=0.25)
    calls = []
    model.backbone.register_forward_hook(lambda module, args, out: calls.append(args[0]))
    data = batch([0, 1, -1, 3, 2, -1, 1, 0])
    out = model.shared_step(data)
    images = data["views"][0]
    assert len(calls) == 1 and torch.equal(calls[0], rotate_batch(images))
    # the same terms from the modules run by hand
    model.eval()  # BatchNorm on running statistics: both passes see the same normalisation
    out = model.shared_step(data)
    x = model.backbone.act1(model.backbone.bn1(model.backbone.conv1(rotate_batch(images))))
    maps = []
    for layer in (model.backbone.layer1, model.backbone.layer2, model.backbone.layer3, model.backbone.layer4):
        x = layer(x)
        maps.append(x)
    feats = model.backbone.forward_head(x, pre_logits=True)
    aux_feats = [branch(m.mean(dim=(2, 3))) for branch, m in zip(model.aux_features, maps)]
    aux_logits = [c(f) for c, f in zip(model.aux_classifiers, aux_feats)]
    ce, joint, kl, feature = lsskd_terms(model.head(feats[0::4]), aux_logits, feats, aux_feats, data["label"], 2.0)
    torch.testing.assert_close(out["loss"], 0.5 * ce + 2.0 * joint + 3.0 * kl + 0.25 * feature, rtol=1e-5, atol=1e-6)
    assert {key[5:] for key in out if key.startswith("loss/")} == {"ce", "joint", "kl", "feature"}
    assert out["logits"].shape == (8, 4) and out["feats"].shape == (8, 64)
    torch.testing.assert_close(out["logits"], model(images), rtol=1e-5, atol=1e-6)


def test_every_auxiliary_head_and_the_backbone_get_gradients_in_training():
    model = lsskd()
    model.shared_step(batch())["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())  # the loss reaches every parameter
    # nonzero everywhere but inside the residual branches, which timm starts silent (each block's last
    # BatchNorm scale is 0), so their inner layers get zero gradients on the first step
    silent = {f"backbone.layer{k}.0.{name}" for k in range(1, 5)
              for name in ("conv1.weight", "bn1.weight", "bn1.bias", "conv2.weight")}
    zero = {name for name, p in model.named_parameters() if p.grad.abs().sum() == 0}
    assert zero <= silent
    aux = [name for name, _ in model.named_parameters() if name.startswith("aux_")]
    # 4 branches, each an MLP (Linear, BN, Linear) and a classifier, with weights and biases
    assert len(aux) == 4 * 8 and not zero & set(aux)


def plain_classifier():
    return Classifier(**TINY_BACKBONE, **SIZES)


def test_forward_and_the_exported_model_are_exactly_a_plain_classifier(tmp_path):
    model = tiny_method(LSSKD, **SIZES, optimizer="adamw", lr=1e-2)
    trainer = quick_trainer(max_steps=2)
    trainer.fit(model, fake_loader(size=16, num_views=1))
    trainer.save_checkpoint(tmp_path / "lsskd.ckpt")
    baseline = plain_classifier()
    baseline_trainer = quick_trainer(max_steps=1)
    baseline_trainer.fit(baseline, fake_loader(size=16, num_views=1))
    baseline_trainer.save_checkpoint(tmp_path / "classifier.ckpt")

    # the inference model: backbone + head, the Classifier's parameters and nothing else
    kept = {k: v for k, v in model.state_dict().items() if not k.startswith("aux_")}
    assert {k: v.shape for k, v in kept.items()} == {k: v.shape for k, v in baseline.state_dict().items()}
    images = batch()["views"][0]
    model.eval(), baseline.eval()
    baseline.load_state_dict(kept, strict=True)
    torch.testing.assert_close(model(images), baseline(images), rtol=0, atol=0)
    reached = torch.autograd.grad(model(images).sum(), list(model.parameters()), allow_unused=True)
    used = {name for (name, _), g in zip(model.named_parameters(), reached) if g is not None}
    assert used == {name for name, _ in baseline.named_parameters()}

    # the exported backbone: the same tensors as a Classifier's, the auxiliary heads left behind
    ours = export_backbone(tmp_path / "lsskd.ckpt", tmp_path / "lsskd.safetensors")
    theirs = export_backbone(tmp_path / "classifier.ckpt", tmp_path / "classifier.safetensors")
    from safetensors.torch import load_file

    exported, reference = load_file(tmp_path / "lsskd.safetensors"), load_file(tmp_path / "classifier.safetensors")
    assert {k: v.shape for k, v in exported.items()} == {k: v.shape for k, v in reference.items()}
    assert ours["builder"] == theirs["builder"] and ours["feature_dim"] == theirs["feature_dim"]
    assert all(torch.equal(exported[k], model.backbone.state_dict()[k]) for k in exported)


def test_a_short_fit_trains_the_auxiliary_heads_validates_and_logs_the_terms():
    model = tiny_method(LSSKD, **SIZES, optimizer="adamw", lr=1e-2)
    model.configure_model()
    before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("aux_") and v.is_floating_point()}
    trainer = quick_trainer(max_steps=2, log_every_n_steps=1, limit_val_batches=1)
    trainer.fit(model, fake_loader(size=16, num_views=1, length=16), fake_loader(size=16, num_views=1))
    metrics = trainer.callback_metrics
    terms = {f"train/loss/{t}" for t in ("ce", "joint", "kl", "feature")}
    assert terms | {"train/top1", "val/top1", "val/loss", "val/ece"} <= set(metrics)
    assert all(torch.isfinite(metrics[t]) for t in terms)
    changed = [k for k, v in before.items() if k.endswith("weight") and not torch.equal(model.state_dict()[k], v)]
    assert len(changed) >= 2 * len(model.aux_classifiers)  # every branch's layers moved


def test_digits_sized_images_train():
    loss = lsskd().shared_step(batch(size=8))["loss"]
    assert torch.isfinite(loss)


def test_a_checkpoint_restores_the_auxiliary_heads(tmp_path):
    model = tiny_method(LSSKD, **SIZES, stages=[0, 2])
    trainer = quick_trainer(max_steps=1)
    trainer.fit(model, fake_loader(size=16, num_views=1))
    trainer.save_checkpoint(tmp_path / "lsskd.ckpt")
    restored = LSSKD.load_from_checkpoint(tmp_path / "lsskd.ckpt", weights_only=True)
    assert restored.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(restored.state_dict()[k], v) for k, v in model.state_dict().items())
    data = batch()
    model.eval(), restored.eval()
    torch.testing.assert_close(restored.shared_step(data)["loss"], model.shared_step(data)["loss"])


@pytest.mark.parametrize("kwargs,match", [
    ({"temperature": 0.0}, "temperature must be > 0"),
    ({"kl_weight": -1.0}, "loss weights must be >= 0"),
    ({"stages": []}, "stages is empty; name at least one stage"),
    ({"aux_hidden_dim": 0}, "aux_hidden_dim must be >= 1"),
])
def test_bad_arguments_are_refused_with_the_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LSSKD(**kwargs)


def test_unknown_stages_and_stageless_backbones_are_refused_with_the_choices():
    with pytest.raises(ValueError, match="LSSKD: stages \\[4\\] do not exist.*'layer1', 'layer2', 'layer3', 'layer4'"):
        lsskd(stages=[0, 4])
    custom = nn.Sequential(nn.Conv2d(1, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = LSSKD(backbone=custom, **SIZES)
    with pytest.raises(ValueError, match="declares no stages"):
        model.configure_model()
