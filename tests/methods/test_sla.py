"""SLA as a method: the rotated batch reaches the backbone inside the step, which weight multiplies which
term, the three inference modes behind ``forward`` (validation, test, predict), short fits that log the
terms, a checkpoint round trip, and the errors for bad arguments."""

import pytest
import torch

from ssl_lightning.components.rotation import aggregated_logits, rotate_batch, single_logits
from ssl_lightning.losses.sla import sla_joint_loss, sla_sd_terms
from ssl_lightning.methods.supervised.sla import SLA

from helpers.fakes import fake_loader, quick_trainer, tiny_method


def sla(**kwargs):
    torch.manual_seed(0)
    model = tiny_method(SLA, in_chans=1, num_classes=4, batch_size=8, **kwargs)
    model.configure_model()
    return model


def batch(labels=None, size=16):
    data = next(iter(fake_loader(size=size, num_views=1)))
    return data if labels is None else {**data, "label": torch.tensor(labels)}


def test_the_backbone_sees_the_four_rotations_of_the_one_view_in_the_step():
    model = sla()
    seen = []
    model.backbone.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    data = batch()
    out = model.shared_step(data)
    assert len(seen) == 1 and torch.equal(seen[0], rotate_batch(data["views"][0]))
    assert out["feats"].shape == (8, 64) and out["logits"].shape == (8, 4)
    assert model.joint_head.out_features == 16 and model.head.out_features == 4


@pytest.mark.parametrize("kwargs,terms", [
    ({"temperature": 2.0, "joint_weight": 4.0}, {"joint", "single", "distill"}),
    ({"self_distillation": False, "inference": "aggregated", "joint_weight": 0.5}, {"joint"}),
])
def test_the_loss_combines_its_terms_with_their_weights(kwargs, terms):
    model = sla(**kwargs)
    data = batch([0, 1, -1, 3, 2, -1, 1, 0])
    out = model.shared_step(data)
    images, labels = data["views"][0], data["label"]
    feats = model.backbone(rotate_batch(images))
    joint = model.joint_head(feats)
    if model.hparams.self_distillation:
        j, s, d = sla_sd_terms(joint, model.head(feats[0::4]), labels, 2.0)
        expected = 4.0 * j + s + d
    else:
        expected = 0.5 * sla_joint_loss(joint, labels)
    torch.testing.assert_close(out["loss"], expected, rtol=1e-6, atol=1e-7)
    assert {key[5:] for key in out if key.startswith("loss/")} == terms


def test_every_parameter_trains_in_each_configuration():
    for kwargs in ({}, {"self_distillation": False, "inference": "single"}):
        model = sla(**kwargs)
        model.shared_step(batch())["loss"].backward()
        missing = [name for name, p in model.named_parameters() if p.grad is None]
        assert not missing  # DDP refuses unused parameters
        assert (model.head is None) == ("self_distillation" in kwargs)


@pytest.mark.parametrize("inference", ["single", "aggregated", "distilled"])
def test_forward_validation_test_and_predict_give_the_chosen_modes_logits(inference):
    model = sla(inference=inference).eval()
    images = batch()["views"][0]
    with torch.no_grad():
        feats = model.backbone(images)
        rotated = model.backbone(rotate_batch(images))
        expected = {"single": single_logits(model.joint_head(rotated)),
                    "aggregated": aggregated_logits(model.joint_head(rotated)),
                    "distilled": model.head(feats)}[inference]
        logits = model(images)
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-6)
        embedded = model.embed(images)
        predicted = model.predict_step({"views": [images], "label": torch.zeros(8), "index": torch.arange(8)}, 0)
    torch.testing.assert_close(embedded["feats"], feats, rtol=1e-5, atol=1e-6)
    assert torch.equal(embedded["embeds"], logits) and torch.equal(predicted["logits"], logits)
    torch.testing.assert_close(predicted["probs"], logits.softmax(1))


def test_training_accuracy_reads_the_chosen_mode():
    model = sla(inference="aggregated")
    data = batch()
    out = model.shared_step(data)
    joint = model.joint_head(model.backbone(rotate_batch(data["views"][0])))
    torch.testing.assert_close(out["logits"], aggregated_logits(joint), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kwargs,terms", [
    ({}, {"joint", "single", "distill"}),
    ({"self_distillation": False, "inference": "aggregated"}, {"joint"}),
])
def test_short_fits_run_validate_and_log_the_terms(kwargs, terms):
    model = tiny_method(SLA, in_chans=1, num_classes=4, batch_size=8, optimizer="adamw", lr=1e-3, **kwargs)
    trainer = quick_trainer(max_steps=2, log_every_n_steps=1, limit_val_batches=1)
    trainer.fit(model, fake_loader(size=16, num_views=1, length=16), fake_loader(size=16, num_views=1))
    metrics = trainer.callback_metrics
    assert {f"train/loss/{t}" for t in terms} | {"train/top1", "val/top1", "val/loss", "val/ece"} <= set(metrics)
    assert all(torch.isfinite(metrics[f"train/loss/{t}"]) for t in terms)
    assert trainer.global_step == 2


def test_8px_digits_sized_images_train():
    model = sla()
    loss = model.shared_step(batch(size=8))["loss"]
    assert torch.isfinite(loss)


def test_a_checkpoint_restores_the_heads_and_the_inference_mode(tmp_path):
    model = tiny_method(SLA, in_chans=1, num_classes=4, batch_size=8, inference="aggregated")
    trainer = quick_trainer(max_steps=1)
    trainer.fit(model, fake_loader(size=16, num_views=1))
    trainer.save_checkpoint(tmp_path / "sla.ckpt")
    restored = SLA.load_from_checkpoint(tmp_path / "sla.ckpt", weights_only=True).eval()
    images = batch()["views"][0]
    assert restored.hparams.inference == "aggregated"
    torch.testing.assert_close(restored(images), model.eval()(images))


@pytest.mark.parametrize("kwargs,match", [
    ({"self_distillation": False}, "Set self_distillation: true, or inference: aggregated"),
    ({"inference": "sd"}, "inference must be one of"),
    ({"temperature": 0.0}, "temperature must be > 0"),
    ({"joint_weight": -1.0}, "joint_weight must be >= 0"),
])
def test_bad_arguments_are_refused_with_the_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SLA(**kwargs)


def test_non_square_images_are_refused_with_the_fix():
    model = sla()
    data = {**batch(), "views": [torch.zeros(8, 1, 16, 12)]}
    with pytest.raises(ValueError, match="square images.*Use a square crop"):
        model.shared_step(data)
