"""USKD as a method: which weight multiplies which term, the weak head on the named stage (the stage map
from the backbone's one pass, its gradient reaching only the layers below it), the weak head left out of
forward, embed, predict and export, a short fit that logs the terms, unlabelled rows, and bad arguments."""

import pytest
import torch
from safetensors.torch import load_file

from ssl_lightning.export import export_backbone
from ssl_lightning.losses import labelled_cross_entropy
from ssl_lightning.losses.uskd import uskd_terms
from ssl_lightning.methods.supervised.uskd import USKD

from helpers.fakes import TINY_BACKBONE, TINY_VIT, fake_loader, quick_trainer, tiny_method

TERMS = {"ce", "target", "non_target", "weak"}


def model(**kwargs):
    torch.manual_seed(0)
    method = USKD(**{**TINY_BACKBONE, "in_chans": 1, "num_classes": 4, "batch_size": 8, **kwargs})
    method.configure_model()
    return method


def batch(labels=None):
    data = next(iter(fake_loader(size=16)))
    return data if labels is None else {**data, "label": torch.tensor(labels)}


def stages_by_hand(backbone, images):
    """The tiny timm ResNet's stage outputs, run module by module."""
    x = backbone.act1(backbone.bn1(backbone.conv1(images)))
    maps = {}
    for name in ("layer1", "layer2", "layer3", "layer4"):
        x = maps[name] = getattr(backbone, name)(x)
    return maps


# ----------------------------------------------------------------- the loss
@pytest.mark.parametrize("flags", [{}, {"keep_target_in_non_target": True, "rank_by": "final"}])
def test_each_weight_multiplies_its_term_and_the_weak_head_reads_the_pooled_stage(flags):
    weights = {"alpha": 0.3, "beta": 0.7, "mu": 0.2, "ce_weight": 0.5}
    method = model(**weights, **flags).eval()  # eval: BatchNorm gives the same maps on both passes
    data = batch([0, 1, -1, 3, 2, -1, 1, 0])
    images, labels = data["views"][0], data["label"]
    out = method.shared_step(data)
    logits = method(images)
    weak_logits = method.weak_head(stages_by_hand(method.backbone, images)["layer3"].mean(dim=(2, 3)))
    target, non_target, weak = uskd_terms(logits, weak_logits, labels, flags.get("keep_target_in_non_target", False),
                                          flags.get("rank_by", "weak_and_final"))
    ce = labelled_cross_entropy(logits, labels)
    torch.testing.assert_close(out["loss"], 0.5 * ce + 0.3 * target + 0.7 * non_target + 0.2 * weak)
    for name, value in (("ce", ce), ("target", target), ("non_target", non_target), ("weak", weak)):
        torch.testing.assert_close(out[f"loss/{name}"], value)
    assert {key[5:] for key in out if key.startswith("loss/")} == TERMS
    assert out["logits"].shape == (8, 4) and out["feats"].shape == (8, 64)


def test_defaults_are_the_official_cifar100_weights():
    hp = model().hparams
    assert (hp.alpha, hp.beta, hp.mu, hp.ce_weight, hp.aux_stage) == (0.1, 0.1, 0.1, 1.0, -2)
    assert (hp.keep_target_in_non_target, hp.rank_by, hp.weak_label_smoothing) == (False, "weak_and_final", 0.1)


# ----------------------------------------------------------------- the weak head's stage
def changed_output(module, factor):
    # prepended: it runs before StageFeatures' hook, which then catches the changed map
    return module.register_forward_hook(lambda mod, args, output: output * factor, prepend=True)


@pytest.mark.parametrize("aux_stage,stage,after", [(-2, "layer3", "layer4"), ("layer2", "layer2", "layer3"),
                                                   (0, "layer1", "layer2")])
def test_the_weak_head_reads_the_named_stage(aux_stage, stage, after):
    method = model(aux_stage=aux_stage).eval()
    widths = {"layer1": 8, "layer2": 16, "layer3": 32}
    assert method.weak_head.in_features == widths[stage]
    data = batch()
    plain = method.shared_step(data)
    # A changed map at the named stage changes the weak term; a change after it leaves the weak term alone
    # and changes the classifier's.
    handle = changed_output(getattr(method.backbone, stage), 1.5)
    assert not torch.allclose(method.shared_step(data)["loss/weak"], plain["loss/weak"])
    handle.remove()
    handle = changed_output(getattr(method.backbone, after), 1.5)
    later = method.shared_step(data)
    handle.remove()
    torch.testing.assert_close(later["loss/weak"], plain["loss/weak"], rtol=0, atol=0)
    assert not torch.allclose(later["loss/ce"], plain["loss/ce"])


def test_the_weak_term_trains_the_weak_head_and_the_layers_below_its_stage_only():
    method = model()
    out = method.shared_step(batch())
    # (timm zero-initialises each block's last BatchNorm scale: at the start only its shortcut and that scale
    # pass a gradient)
    block = method.backbone.layer3[0]
    below = [block.bn2.weight, block.downsample[0].weight, method.backbone.conv1.weight]
    above = list(method.backbone.layer4.parameters()) + list(method.head.parameters())
    grads = torch.autograd.grad(out["loss/weak"], below + above + list(method.weak_head.parameters()),
                                allow_unused=True, retain_graph=True)
    assert all(g is not None and g.abs().sum() > 0 for g in grads[:len(below)])
    assert all(g is None or torch.count_nonzero(g) == 0 for g in grads[len(below):len(below) + len(above)])
    assert all(g.abs().sum() > 0 for g in grads[len(below) + len(above):])
    # the other terms do not reach the weak head: it only ranks classes for the Zipf labels
    others = out["loss/ce"] + out["loss/target"] + out["loss/non_target"]
    grads = torch.autograd.grad(others, list(method.weak_head.parameters()), allow_unused=True)
    assert all(g is None or torch.count_nonzero(g) == 0 for g in grads)


def test_a_vit_weak_head_reads_a_block_averaged_over_its_tokens():
    method = USKD(**TINY_VIT, in_chans=1, num_classes=4, batch_size=8)
    method.configure_model()
    assert method.stage_features.names == ["blocks.0"] and method.weak_head.in_features == 192
    out = method.shared_step(batch())
    assert torch.isfinite(out["loss"]) and out["loss/weak"] > 0


def test_a_torchvision_resnet18_gives_the_official_256_channel_weak_head():
    # cls_KD's CIFAR-100 config: channel=256, ResNet-18's third stage (fea_s[-2]); measured by a dummy pass here
    method = USKD(backbone="torchvision.resnet18", num_classes=4)
    method.configure_model()
    assert method.stage_features.names == ["layer3"] and method.weak_head.in_features == 256


# ----------------------------------------------------------------- training only
def test_forward_embed_and_predict_are_the_plain_classifier_without_the_weak_head():
    method = model().eval()
    images = batch()["views"][0]
    with torch.no_grad():
        expected = method.head(method.backbone(images))
        method.weak_head.weight.fill_(float("nan"))  # any use of the weak head would show
        torch.testing.assert_close(method(images), expected, rtol=0, atol=0)
        torch.testing.assert_close(method.embed(images)["embeds"], expected, rtol=0, atol=0)
        predicted = method.predict_step(batch(), 0)
        torch.testing.assert_close(predicted["logits"], expected, rtol=0, atol=0)


def test_a_short_fit_logs_every_term_trains_the_weak_head_and_exports_the_plain_backbone(tmp_path):
    method = model(optimizer="adamw", lr=1e-2)
    initial_weak = method.weak_head.weight.detach().clone()
    trainer = quick_trainer(max_steps=2, log_every_n_steps=1)
    trainer.fit(method, fake_loader(size=16))
    assert {f"train/loss/{name}" for name in TERMS} <= set(trainer.callback_metrics)
    assert all(torch.isfinite(trainer.callback_metrics[f"train/loss/{name}"]) for name in TERMS)
    assert not torch.equal(method.weak_head.weight, initial_weak)
    trainer.save_checkpoint(tmp_path / "uskd.ckpt")
    state = torch.load(tmp_path / "uskd.ckpt", weights_only=True)["state_dict"]
    assert {"weak_head.weight", "weak_head.bias"} <= set(state)  # for resume
    assert {key.split(".")[0] for key in state} == {"backbone", "head", "weak_head"}
    export_backbone(tmp_path / "uskd.ckpt", tmp_path / "backbone.safetensors")
    exported = load_file(str(tmp_path / "backbone.safetensors"))
    assert exported.keys() == method.backbone.state_dict().keys()
    restored = USKD.load_from_checkpoint(tmp_path / "uskd.ckpt", weights_only=True)
    assert torch.equal(restored.weak_head.weight, method.weak_head.weight)


def test_digits_sized_images_and_ten_classes_with_the_registry_defaults():
    # what the cross-cutting tests build: tiny_method with no USKD argument, 1-channel 8x8 images, 10 classes
    method = tiny_method(USKD, in_chans=1, num_classes=10, batch_size=8)
    method.configure_model()
    data = next(iter(fake_loader(size=8, num_classes=10)))
    out = method.shared_step(data)
    assert torch.isfinite(out["loss"]) and out["logits"].shape == (8, 10)


# ----------------------------------------------------------------- labels and arguments
def test_an_unlabelled_batch_gives_zero_and_no_gradient():
    method = model()
    out = method.shared_step(batch([-1] * 8))
    params = list(method.head.parameters()) + list(method.weak_head.parameters()) + list(method.backbone.parameters())
    grads = torch.autograd.grad(out["loss"], params, allow_unused=True)
    assert out["loss"].item() == 0.0 and all(g is None or torch.count_nonzero(g) == 0 for g in grads)


@pytest.mark.parametrize("kwargs,message", [
    ({"alpha": -0.1}, r"USKD: alpha must be >= 0, got -0.1"),
    ({"mu": -1.0}, r"USKD: mu must be >= 0"),
    ({"rank_by": "weak"}, r"USKD: rank_by must be one of \('weak_and_final', 'final'\), got 'weak'"),
    ({"weak_label_smoothing": 2.0}, r"weak_label_smoothing must be in \[0, 1\]"),
    ({"aux_stage": 2.5}, r"aux_stage must be a stage index \(e.g. -2\) or a module name \(e.g. 'layer3'\)"),
    ({"aux_stage": True}, r"aux_stage must be a stage index"),
])
def test_bad_arguments_are_refused_at_construction_with_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        USKD(**TINY_BACKBONE, in_chans=1, num_classes=4, **kwargs)


@pytest.mark.parametrize("aux_stage,message", [
    (4, r"USKD: stages \[4\] do not exist; the backbone has 4 stages \['layer1', 'layer2', 'layer3', 'layer4'\]"),
    (-5, r"USKD: stages \[-5\] do not exist"),
    ("layer9", r"has no module 'layer9'; its stages are \['layer1', 'layer2', 'layer3', 'layer4'\]"),
])
def test_a_stage_the_backbone_lacks_is_refused_when_it_is_built(aux_stage, message):
    method = USKD(**TINY_BACKBONE, in_chans=1, num_classes=4, aux_stage=aux_stage)
    with pytest.raises(ValueError, match=message):
        method.configure_model()
