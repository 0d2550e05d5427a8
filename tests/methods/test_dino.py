"""What DINO promises beyond its family: multi-crop (the teacher sees only the two global crops, the
backbone runs once per crop size, the loss sums exactly the pairs i != j), the last layer frozen
through the first epoch, the weight-norm gain frozen at 1, the teacher temperature's warm-up, DINO's
per-parameter gradient clipping, the centre as a checkpointed buffer, fits with a ResNet and a ViT,
and the errors for a recipe without two global crops."""

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from ssl_lightning.core.optimization import clip_gradients_per_parameter
from ssl_lightning.datamodules import Digits, ViewSpec
from ssl_lightning.methods.ssl import dino
from ssl_lightning.methods.ssl.dino import DINO, teacher_temperature

from helpers.fakes import TINY_VIT, fake_loader, quick_trainer, tiny_method

OUT_DIM = 64
#: a ViT that takes every crop size (timm interpolates its position embeddings), as DINO's does
MULTI_SIZE_VIT = {**TINY_VIT, "backbone_kwargs": {**TINY_VIT["backbone_kwargs"], "dynamic_img_size": True}}
#: 2 global crops of 16 px and 4 local crops of 8 px (multiples of the tiny ViT's patch 4)
SMALL_MULTI_CROP = [ViewSpec(num=2, crop_scale=(0.4, 1.0)), ViewSpec(num=4, crop_size=8, crop_scale=(0.05, 0.4))]


def tiny_dino(backbone=None, **kwargs):
    defaults = {"in_chans": 1, "num_classes": 4, "batch_size": 8, "out_dim": OUT_DIM}
    return tiny_method(DINO, backbone=backbone, **{**defaults, **kwargs})


def multi_crop_batch(num_images=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    views = [torch.randn(num_images, 1, 16, 16, generator=generator) for _ in range(2)]
    views += [torch.randn(num_images, 1, 8, 8, generator=generator) for _ in range(4)]
    return {"views": views, "label": torch.zeros(num_images, dtype=torch.long), "index": torch.arange(num_images)}


class Recorder:
    """Wraps a function of the dino module, recording its arguments."""

    def __init__(self, function):
        self.function, self.calls = function, []

    def __call__(self, *args, **kwargs):
        self.calls.append(args)
        return self.function(*args, **kwargs)


def record_inputs(module, calls):
    return module.register_forward_pre_hook(lambda _, inputs: calls.append(inputs[0].detach().clone()))


# ---------------------------------------------------------------- multi-crop


def test_teacher_sees_only_the_global_crops_and_the_backbone_runs_once_per_crop_size(monkeypatch):
    model = tiny_dino(MULTI_SIZE_VIT)
    model.configure_model()
    student_calls, teacher_calls = [], []
    record_inputs(model.backbone, student_calls)
    record_inputs(model.teacher.module[0], teacher_calls)
    batch = multi_crop_batch()

    model.shared_step(batch)

    views = batch["views"]
    assert [tuple(x.shape) for x in student_calls] == [(8, 1, 16, 16), (16, 1, 8, 8)]  # one pass per size
    assert torch.equal(student_calls[0], torch.cat(views[:2])) and torch.equal(student_calls[1], torch.cat(views[2:]))
    assert len(teacher_calls) == 1 and torch.equal(teacher_calls[0], torch.cat(views[:2]))  # global crops only


def test_each_crop_is_scored_by_the_student_and_the_loss_sums_exactly_the_pairs_of_different_crops(monkeypatch):
    model = tiny_dino(MULTI_SIZE_VIT, warmup_teacher_temp_epochs=0)
    model.configure_model()
    model.centre.normal_()  # a centre that matters
    losses, targets = Recorder(dino.dino_loss), Recorder(dino.dino_teacher_targets)
    monkeypatch.setattr(dino, "dino_loss", losses)
    monkeypatch.setattr(dino, "dino_teacher_targets", targets)
    batch = multi_crop_batch()
    centre = model.centre.clone()

    out = model.shared_step(batch)

    student_logits, teacher_targets, student_temp = losses.calls[0]
    with torch.no_grad():  # a ViT's output for an image does not depend on its batch: crop by crop
        for j, view in enumerate(batch["views"]):
            torch.testing.assert_close(student_logits[j], model.projector(model.backbone(view)))
        for i, view in enumerate(batch["views"][:2]):
            expected = torch.softmax((model.teacher(view) - centre) / 0.07, dim=-1)
            torch.testing.assert_close(teacher_targets[i], expected)
    assert student_temp == 0.1
    # the plain loss over the 2 x 6 - 2 pairs (teacher crop i, student crop j), i != j
    log_p = torch.log_softmax(student_logits.detach().double() / 0.1, dim=-1)
    q = teacher_targets.double()
    pairs = [(i, j) for i in range(2) for j in range(6) if i != j]
    expected_loss = sum(-(q[i] * log_p[j]).sum(dim=-1).mean() for i, j in pairs) / len(pairs)
    torch.testing.assert_close(out["loss"].double(), expected_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["feats"], model.backbone(batch["views"][0]))  # the probe's: global crop 0


def test_the_centre_moves_by_the_global_batch_teacher_outputs_after_the_targets():
    model = tiny_dino(MULTI_SIZE_VIT)
    model.configure_model()
    batch = multi_crop_batch()
    with torch.no_grad():
        teacher_logits = model.teacher(torch.cat(batch["views"][:2]))
    model.shared_step(batch)
    torch.testing.assert_close(model.centre, 0.1 * teacher_logits.mean(dim=0, keepdim=True))  # from zero, m = 0.9


# ---------------------------------------------------------------- the head's last layer


class LastLayerAtEpochEnd(L.Callback):
    def __init__(self):
        self.last_layer, self.gain, self.mlp = [], [], []

    def on_train_epoch_end(self, trainer, module):
        self.last_layer.append(module.projector.last_layer.weight.detach().clone())
        self.gain.append(module.projector.last_layer.gain.detach().clone())
        self.mlp.append(module.projector.mlp[0].weight.detach().clone())


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_the_last_layer_gets_no_update_in_the_first_epoch_only_and_the_gain_stays_frozen(norm_last_layer):
    model = tiny_dino(norm_last_layer=norm_last_layer, optimizer="sgd", lr=0.5, warmup_epochs=0.0, freeze_last_layer=1)
    model.configure_model()
    initial_last_layer = model.projector.last_layer.weight.detach().clone()
    initial_mlp = model.projector.mlp[0].weight.detach().clone()
    seen = LastLayerAtEpochEnd()
    quick_trainer(max_epochs=2, limit_val_batches=0, callbacks=[seen]).fit(model, fake_loader(batch_size=8, length=16))

    assert torch.equal(seen.last_layer[0], initial_last_layer)  # no gradient step and no weight decay in epoch 0
    assert not torch.equal(seen.mlp[0], initial_mlp)  # while the rest trains
    assert not torch.equal(seen.last_layer[1], seen.last_layer[0])  # and from epoch 1 the last layer does too
    assert torch.equal(seen.gain[0], torch.ones(OUT_DIM, 1))
    if norm_last_layer:  # the gain is a buffer fixed at 1: every output row is a unit vector
        assert "gain" in dict(model.projector.last_layer.named_buffers())
        assert all(p is not model.projector.last_layer.gain for p in model.parameters())
        assert torch.equal(seen.gain[1], torch.ones(OUT_DIM, 1))
    else:  # DINO's norm_last_layer=False: a trainable gain, frozen with the layer in epoch 0
        assert model.projector.last_layer.gain.requires_grad
        assert not torch.equal(seen.gain[1], seen.gain[0])


def test_the_head_scores_the_normalised_bottleneck_against_gain_scaled_unit_rows():
    model = tiny_dino(norm_last_layer=False)
    model.configure_model()
    head = model.projector
    with torch.no_grad():
        head.last_layer.gain.uniform_(0.5, 2.0)
    x = torch.randn(5, model.feat_dim)
    bottleneck = head.mlp(x)
    bottleneck = bottleneck / bottleneck.norm(dim=1, keepdim=True)
    rows = head.last_layer.weight / head.last_layer.weight.norm(dim=1, keepdim=True)
    torch.testing.assert_close(head(x), bottleneck @ (head.last_layer.gain * rows).T)
    embeds = model.embed(torch.randn(3, 1, 16, 16))["embeds"]
    assert embeds.shape == (3, 256)
    torch.testing.assert_close(embeds.norm(dim=1), torch.ones(3))


# ---------------------------------------------------------------- schedules and clipping


def official_teacher_temp_schedule(warmup_temp, temp, warmup_epochs, epochs):
    """facebookresearch/dino ``DINOLoss.teacher_temp_schedule``."""
    return np.concatenate((np.linspace(warmup_temp, temp, warmup_epochs), np.ones(epochs - warmup_epochs) * temp))


@pytest.mark.parametrize("warmup_epochs", [30, 3, 1, 0])
def test_teacher_temperature_is_the_official_per_epoch_schedule(warmup_epochs):
    expected = official_teacher_temp_schedule(0.04, 0.07, warmup_epochs, 100)
    for epoch in range(100):
        assert teacher_temperature(epoch, 0.04, 0.07, warmup_epochs) == pytest.approx(expected[epoch], rel=1e-12)
    assert teacher_temperature(150, 0.04, 0.07, warmup_epochs) == 0.07


def test_the_fit_uses_each_epochs_teacher_temperature(monkeypatch):
    targets = Recorder(dino.dino_teacher_targets)
    monkeypatch.setattr(dino, "dino_teacher_targets", targets)
    model = tiny_dino(warmup_teacher_temp_epochs=3, optimizer="sgd", lr=0.1)
    quick_trainer(max_epochs=4, limit_val_batches=0).fit(model, fake_loader(batch_size=8, length=8))  # 1 step/epoch
    assert [call[1] for call in targets.calls] == pytest.approx([0.04, 0.055, 0.07, 0.07])


def official_clip_gradients(grads, clip):
    """facebookresearch/dino ``utils.clip_gradients``, one parameter at a time."""
    clipped = []
    for grad in grads:
        norm = grad.norm(2).item()
        coefficient = clip / (norm + 1e-6)
        clipped.append(grad * coefficient if coefficient < 1 else grad.clone())
    return clipped


def test_per_parameter_clipping_matches_dinos_clip_gradients():
    generator = torch.Generator().manual_seed(0)
    parameters = [torch.nn.Parameter(torch.zeros(shape)) for shape in [(4, 3), (5,), (2, 2, 2), (3,)]]
    scales = [10.0, 0.01, 3.0, 1.0]
    for parameter, scale in zip(parameters, scales):
        parameter.grad = torch.randn(parameter.shape, generator=generator) * scale
    parameters[3].grad = None  # no gradient: left alone
    expected = official_clip_gradients([p.grad for p in parameters[:3]], 1.0)
    trainer = L.Trainer(accelerator="cpu", logger=False)
    clip_gradients_per_parameter(parameters, 1.0, trainer)
    for parameter, clipped in zip(parameters, expected):
        torch.testing.assert_close(parameter.grad, clipped)
    assert parameters[3].grad is None
    norms = [p.grad.norm().item() for p in parameters[:3]]
    assert norms[0] == pytest.approx(1.0, rel=1e-5) and norms[1] < 0.1  # a small gradient keeps its norm


def test_a_rank_without_a_slice_of_the_clipped_parameters_still_joins_the_sharded_all_reduce(monkeypatch):
    # Under FSDP a small parameter (iBOT's mask token) may lie wholly on the other rank: this rank's
    # gradient is None, and returning early would leave the other rank waiting in its all-reduce.
    from types import SimpleNamespace

    from torch.distributed.fsdp import ShardingStrategy

    from ssl_lightning.core import optimization

    class Sharded:
        sharding_strategy, process_group = ShardingStrategy.FULL_SHARD, "group"

    reduced = []
    monkeypatch.setattr(optimization, "FullyShardedDataParallel", Sharded)
    monkeypatch.setattr(optimization.dist, "all_reduce", lambda tensor, group: reduced.append((tensor.clone(), group)))
    trainer = SimpleNamespace(strategy=SimpleNamespace(model=Sharded()))
    mask_token = torch.nn.Parameter(torch.zeros(0))  # this rank's empty slice, no gradient
    clip_gradients_per_parameter([mask_token], 1.0, trainer)
    assert len(reduced) == 1 and reduced[0][1] == "group" and torch.equal(reduced[0][0], torch.zeros(1))


class GradientNorms(L.Callback):
    """The student's gradient norms as the optimizer used them (Lightning zeroes them next step)."""

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        student = torch.nn.ModuleList([module.backbone, module.projector])
        self.norms = {name: p.grad.norm().item() for name, p in student.named_parameters() if p.grad is not None}
        self.missing = {name for name, p in student.named_parameters() if p.grad is None}


@pytest.mark.parametrize("clip_grad", [1e-3, 0.0])
def test_the_fit_clips_every_parameters_gradient_on_its_own(clip_grad):
    norms = GradientNorms()
    model = tiny_dino(clip_grad=clip_grad, optimizer="sgd", lr=0.1)
    quick_trainer(max_steps=1, limit_val_batches=0, callbacks=[norms]).fit(model, fake_loader(batch_size=8, length=16))
    assert norms.missing == {"1.last_layer.weight"}  # epoch 0: the last layer's gradient is dropped
    if clip_grad:
        assert max(norms.norms.values()) <= clip_grad * (1 + 1e-4)
        clipped = [norm for norm in norms.norms.values() if norm == pytest.approx(clip_grad, rel=1e-4)]
        assert len(clipped) > len(norms.norms) / 2  # each scaled to the limit on its own (some are 0: timm's
        # zero-initialised last BatchNorm of each residual block stops its branch's gradient at the start)
    else:
        assert max(norms.norms.values()) > 1e-3  # so the clipped case above did clip


# ---------------------------------------------------------------- fits, checkpoint, bad input


def test_resnet_fit_with_dino_multi_crop_views_checkpoints_its_centre(tmp_path):
    model = tiny_dino(in_chans=None, num_classes=None, batch_size=None, optimizer="sgd", lr=0.1)
    trainer = quick_trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(model, Digits(batch_size=32, num_workers=0, image_size=16, views="dino"))  # 2 x 16 px + 6 x 7 px
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert "centre" in model.state_dict() and model.centre.abs().sum() > 0
    path = tmp_path / "dino.ckpt"
    trainer.save_checkpoint(path)
    restored = DINO.load_from_checkpoint(path, weights_only=True)
    assert torch.equal(restored.centre, model.centre)
    for key, value in model.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key


@pytest.mark.parametrize("views, centering", [(SMALL_MULTI_CROP, "centre"), ("simclr", "sinkhorn_knopp")])
def test_vit_fit_on_multi_crop_and_global_only_views(views, centering):
    model = tiny_dino(MULTI_SIZE_VIT, in_chans=None, num_classes=None, batch_size=None, centering=centering)
    trainer = quick_trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(model, Digits(batch_size=16, num_workers=0, image_size=16, views=views))
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert ("centre" in model.state_dict()) == (centering == "centre")


def test_a_recipe_without_two_global_crops_names_the_view_recipe():
    recipe = [ViewSpec(num=1), ViewSpec(num=4, crop_size=14, crop_scale=(0.05, 0.4))]
    model = tiny_dino(in_chans=None, num_classes=None, batch_size=None)
    with pytest.raises(ValueError, match=r"DINO needs a view recipe that starts with 2 global crops of one size .*"
                                         r"data.views=\[ViewSpec\(num=1.*makes crops of sizes \[32, 14, 14, 14, 14\]"):
        quick_trainer(max_steps=1).fit(model, Digits(batch_size=32, num_workers=0, views=recipe))


def test_a_batch_without_two_global_crops_is_refused_at_the_step():
    model = tiny_dino()
    model.configure_model()
    batch = multi_crop_batch()
    batch["views"] = batch["views"][:1] + batch["views"][2:]  # one global crop, then the local ones
    with pytest.raises(ValueError, match=r"teacher takes the first 2 views.*sizes \[\(16, 16\), \(8, 8\)"):
        model.shared_step(batch)


def test_a_vit_of_one_input_size_with_multi_crop_views_says_how_to_fix_it():
    model = tiny_dino(TINY_VIT, in_chans=None, num_classes=None, batch_size=None)
    with pytest.raises(ValueError, match="takes one input size.*dynamic_img_size: true"):
        quick_trainer(max_steps=1).fit(model, Digits(batch_size=16, num_workers=0, image_size=16,
                                                    views=SMALL_MULTI_CROP))


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="unknown centering 'mean'"):
        DINO(centering="mean")
    with pytest.raises(ValueError, match="clip_grad >= 0"):
        DINO(clip_grad=-1.0)


def test_two_view_batches_from_a_plain_loader_train():
    model = tiny_dino(optimizer="sgd", lr=0.1)
    loader = fake_loader(batch_size=8, length=16)
    assert isinstance(loader, DataLoader)
    trainer = quick_trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(model, loader)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
