"""What iBOT promises beyond its family: blockwise masks (DINOv2's generator, the ratio range, rectangles,
seeded), the teacher on the unmasked global crops only, the mask token at the student's masked
patches, the loss wiring (patch targets of the same crop, Sinkhorn-Knopp on the masked patches, KoLeo),
both centres, shared and separate heads, the teacher temperatures, a short fit with its logged terms
and the teacher's EMA, an export as a plain timm ViT, and the errors for bad arguments."""

import math
import random

import lightning as L
import numpy as np
import pytest
import timm
import torch

from ssl_lightning.components.masking import add_random_block, block_mask, ibot_block_masks
from ssl_lightning.datamodules import Digits, ViewSpec
from ssl_lightning.losses.sinkhorn import sinkhorn_knopp
from ssl_lightning.methods.ssl import ibot
from ssl_lightning.methods.ssl.ibot import IBOT

from helpers.fakes import TINY_BACKBONE, TINY_DYNAMIC_VIT, fake_loader, quick_trainer

OUT_DIM = 64
SMALL = {"out_dim": OUT_DIM, "proj_hidden_dim": 32, "bottleneck_dim": 16}


def tiny_ibot(build=True, **kwargs):
    defaults = {"in_chans": 1, "num_classes": 4, "batch_size": 8, **SMALL}
    model = IBOT(**TINY_DYNAMIC_VIT, **{**defaults, **kwargs})
    if build:  # else the DataModule's facts (channels, classes) come first
        model.configure_model()
    return model


def multi_crop_batch(num_images=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    views = [torch.randn(num_images, 1, 16, 16, generator=generator) for _ in range(2)]
    views += [torch.randn(num_images, 1, 8, 8, generator=generator) for _ in range(2)]
    return {"views": views, "label": torch.zeros(num_images, dtype=torch.long), "index": torch.arange(num_images)}


class Recorder:
    """Wraps a function of the ibot module, recording its arguments and result."""

    def __init__(self, function):
        self.function, self.calls, self.results = function, [], []

    def __call__(self, *args, **kwargs):
        self.calls.append(args)
        self.results.append(self.function(*args, **kwargs))
        return self.results[-1]


# ---------------------------------------------------------------- masks


def official_masking_generator(grid, num_masking_patches, rng, min_num_patches=4, max_num_patches=None, min_aspect=0.3):
    """facebookresearch/dinov2 ``MaskingGenerator`` (``__call__`` and ``_mask``) as written there, with
    ``rng`` for the module ``random``."""
    height, width = grid
    max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
    log_aspect_ratio = (math.log(min_aspect), math.log(1 / min_aspect))

    def _mask(mask, max_mask_patches):
        delta = 0
        for _ in range(10):
            target_area = rng.uniform(min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(rng.uniform(*log_aspect_ratio))
            h = round(math.sqrt(target_area * aspect_ratio))
            w = round(math.sqrt(target_area / aspect_ratio))
            if w < width and h < height:
                top = rng.randint(0, height - h)
                left = rng.randint(0, width - w)
                num_masked = mask[top: top + h, left: left + w].sum()
                if 0 < h * w - num_masked <= max_mask_patches:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i, j] == 0:
                                mask[i, j] = 1
                                delta += 1
                if delta > 0:
                    break
        return delta

    mask = np.zeros((height, width), dtype=bool)
    mask_count = 0
    while mask_count < num_masking_patches:
        max_mask_patches = min(num_masking_patches - mask_count, max_num_patches)
        delta = _mask(mask, max_mask_patches)
        if delta == 0:
            break
        mask_count += delta
    return mask


@pytest.mark.parametrize("grid, count, max_block", [((14, 14), 60, 98), ((8, 8), 20, None), ((4, 4), 5, 8), ((2, 2), 1, 2)])
def test_block_mask_is_dinov2s_masking_generator_draw_for_draw(grid, count, max_block):
    for seed in range(20):
        expected = official_masking_generator(grid, count, random.Random(seed), max_num_patches=max_block)
        assert np.array_equal(block_mask(grid, count, random.Random(seed), max_num_patches=max_block), expected)
        assert expected.sum() <= count


def test_a_block_is_one_filled_rectangle_within_the_budget():
    for seed in range(50):
        mask = np.zeros((8, 8), dtype=bool)
        added = add_random_block(mask, budget=20, rng=random.Random(seed))
        rows, cols = np.nonzero(mask)
        assert 1 <= added == mask.sum() <= 20
        box = mask[rows.min(): rows.max() + 1, cols.min(): cols.max() + 1]
        assert box.all()  # contiguous: the bounding box is filled
        assert box.shape[0] < 8 and box.shape[1] < 8


def test_half_the_crops_are_masked_each_within_the_ratio_range():
    masks = ibot_block_masks(64, (14, 14), (0.1, 0.5), 0.5, generator=torch.Generator().manual_seed(0))
    assert masks.mask.shape == (64, 196) and masks.mask.dtype == torch.bool
    ratios = masks.mask.sum(dim=1) / 196
    masked = ratios[ratios > 0]
    assert len(masked) == 32  # int(64 * 0.5) crops masked, the others whole
    assert masked.max() <= 0.5 and masked.min() >= int(196 * 0.1) / 196
    # stratified: one ratio from each of 32 equal slices of [0.1, 0.5], so the batch covers the range
    assert masked.min() < 0.12 and masked.max() > 0.48
    assert torch.equal(masks.positions, masks.mask.flatten().nonzero().squeeze(1))
    assert not torch.equal(masks.mask[:32].sum(dim=1) > 0, torch.ones(32, dtype=torch.bool))  # shuffled


def test_masks_are_deterministic_for_a_seed_on_a_generator_or_the_global_rng():
    def draw(generator=None):
        return ibot_block_masks(16, (8, 8), generator=generator).mask

    first = draw(torch.Generator().manual_seed(3))
    assert torch.equal(first, draw(torch.Generator().manual_seed(3)))
    assert not torch.equal(first, draw(torch.Generator().manual_seed(4)))
    torch.manual_seed(5)
    from_global = draw()
    torch.manual_seed(5)
    assert torch.equal(from_global, draw())


@pytest.mark.parametrize("ratio_range", [(0.2, 1.0), (0.5, 0.1), (-0.1, 0.3)])
def test_a_mask_ratio_range_outside_zero_to_one_is_refused(ratio_range):
    with pytest.raises(ValueError, match=r"mask_ratio_range must satisfy 0 <= min <= max < 1"):
        ibot_block_masks(4, (4, 4), ratio_range)
    with pytest.raises(ValueError, match=r"IBOT needs 0 <= mask_ratio_range\[0\] <= mask_ratio_range\[1\] < 1"):
        IBOT(mask_ratio_range=ratio_range)


# ---------------------------------------------------------------- what each network sees


def test_teacher_sees_the_unmasked_global_crops_and_the_student_masked_global_and_plain_local_crops():
    model = tiny_ibot()
    student_calls, teacher_calls = [], []
    model.backbone.register_forward_pre_hook(lambda _, args, kwargs: student_calls.append((args, kwargs)),
                                             with_kwargs=True)
    model.teacher.module.backbone.register_forward_pre_hook(
        lambda _, args, kwargs: teacher_calls.append((args, kwargs)), with_kwargs=True)
    batch = multi_crop_batch()
    model.shared_step(batch)

    views = batch["views"]
    assert len(teacher_calls) == 1
    (images,), kwargs = teacher_calls[0]
    assert torch.equal(images, torch.cat(views[:2])) and kwargs["masks"] is None  # global crops, whole
    assert len(student_calls) == 2
    (images,), kwargs = student_calls[0]
    assert torch.equal(images, torch.cat(views[:2])) and kwargs["masks"].shape == (8, 16)
    assert kwargs["mask_token"] is model.mask_token
    (local,), kwargs = student_calls[1]
    assert torch.equal(local, torch.cat(views[2:])) and kwargs == {}  # local crops: one plain pass


def test_the_students_masked_patches_are_the_mask_token_before_the_position_embedding():
    model = tiny_ibot()
    with torch.no_grad():
        model.mask_token.normal_()
    crops = torch.randn(6, 1, 16, 16)
    masks = torch.zeros(6, 16, dtype=torch.bool)
    masks[0, [0, 5, 6]] = masks[3, :8] = True
    seen = []
    model.backbone.norm_pre.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    feats, patches = model.backbone(crops, masks=masks, mask_token=model.mask_token, return_patch_tokens=True)

    tokens = seen[0][:, 1:] - model.backbone.pos_embed[:, 1:]  # the patch embeddings the blocks received
    embedded = model.backbone.patch_embed(crops).flatten(1, 2)
    torch.testing.assert_close(tokens[masks], model.mask_token.expand(int(masks.sum()), -1))
    torch.testing.assert_close(tokens[~masks], embedded[~masks])
    # so the pixels under masked patches do not matter, and the others do
    changed = crops.clone()
    changed[0, :, :4, :4] += 5.0  # patch 0 of crop 0: masked
    changed[1, :, :4, :4] += 5.0  # patch 0 of crop 1: not masked
    feats_changed, patches_changed = model.backbone(changed, masks=masks, mask_token=model.mask_token,
                                                    return_patch_tokens=True)
    torch.testing.assert_close(feats_changed[0], feats[0])
    torch.testing.assert_close(patches_changed[0], patches[0])
    assert not torch.allclose(feats_changed[1], feats[1])
    # without masks it is timm's ViT: the pooled features are its forward's
    torch.testing.assert_close(model.backbone(crops, return_patch_tokens=True)[0], model.backbone(crops))


# ---------------------------------------------------------------- the loss


@pytest.mark.parametrize("centering", ["centre", "sinkhorn_knopp"])
def test_the_loss_adds_the_cls_patch_and_koleo_terms_with_targets_of_the_same_crop(monkeypatch, centering):
    patch_losses, patch_targets = Recorder(ibot.ibot_patch_loss), Recorder(ibot.ibot_patch_targets)
    monkeypatch.setattr(ibot, "ibot_patch_loss", patch_losses)
    monkeypatch.setattr(ibot, "ibot_patch_targets", patch_targets)
    model = tiny_ibot(centering=centering, koleo_weight=0.1, patch_loss_weight=0.5, warmup_teacher_temp_epochs=0)
    batch = multi_crop_batch()
    torch.manual_seed(0)
    out = model.shared_step(batch)

    torch.testing.assert_close(out["loss"], out["loss/cls"] + 0.5 * out["loss/patch"] + 0.1 * out["loss/koleo"])
    student_patches, targets, masks, student_temp = patch_losses.calls[0]
    crops = torch.cat(batch["views"][:2])
    torch.manual_seed(0)
    expected_masks = ibot_block_masks(8, (4, 4)).mask  # drawn from the global RNG, as the step did
    assert torch.equal(masks, expected_masks) and student_temp == 0.1
    with torch.no_grad():
        teacher = model.teacher(crops)  # crop c's targets come from the teacher's crop c, unmasked
        student = model._online_network()(crops, masks, model.mask_token)
    torch.testing.assert_close(student_patches, student.patch_logits)
    teacher_patches, temperature = patch_targets.calls[0][:2]
    torch.testing.assert_close(teacher_patches, teacher.patch_logits)
    assert temperature == 0.07
    if centering == "sinkhorn_knopp":  # DINOv2: balanced over the masked teacher patches only
        torch.testing.assert_close(targets[masks], sinkhorn_knopp(teacher.patch_logits[masks].double(), 0.07, 3).float())
        assert torch.all(targets[~masks] == 0)
    koleo = sum(ibot.koleo_loss(feats) for feats in student.feats.chunk(2))
    torch.testing.assert_close(out["loss/koleo"], koleo)
    torch.testing.assert_close(out["feats"], student.feats[:4])


def test_both_centres_move_by_the_teacher_outputs_after_the_targets():
    model = tiny_ibot()
    batch = multi_crop_batch()
    with torch.no_grad():
        teacher = model.teacher(torch.cat(batch["views"][:2]))
    model.shared_step(batch)
    torch.testing.assert_close(model.centre, 0.1 * teacher.cls_logits.mean(dim=0, keepdim=True))
    # iBOT's center2: every patch of every global crop, masked or not
    torch.testing.assert_close(model.patch_centre, 0.1 * teacher.patch_logits.mean(dim=(0, 1)).unsqueeze(0))


def test_shared_and_separate_heads():
    shared = tiny_ibot()
    assert shared.patch_projector is None and "patch_centre" in dict(shared.named_buffers())
    crops = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        out = shared._online_network()(crops)
        feats, patches = shared.backbone(crops, return_patch_tokens=True)
        torch.testing.assert_close(out.patch_logits, shared.projector(patches))  # one head for both tokens
        torch.testing.assert_close(out.cls_logits, shared.projector(feats))

    separate = tiny_ibot(shared_head=False, patch_out_dim=48, centering="sinkhorn_knopp")
    assert separate.patch_projector.last_layer.weight.shape == (48, 16)
    assert "centre" not in dict(separate.named_buffers())
    with torch.no_grad():
        out = separate._online_network()(crops)
        feats, patches = separate.backbone(crops, return_patch_tokens=True)
        torch.testing.assert_close(out.patch_logits, separate.patch_projector(patches))
    assert out.cls_logits.shape == (4, OUT_DIM) and out.patch_logits.shape == (4, 16, 48)
    teacher = dict(separate.teacher.module.named_parameters())
    student = dict(separate._online_network().named_parameters())
    assert teacher.keys() == student.keys() and any(name.startswith("patch_projector.") for name in teacher)
    assert "mask_token" not in teacher  # the teacher never masks


def test_teacher_temperatures_per_epoch_and_per_step(monkeypatch):
    model = tiny_ibot(warmup_teacher_patch_temp=0.05, teacher_patch_temp=0.06)
    assert (model.teacher_temp_now(), model.teacher_patch_temp_now()) == (0.04, 0.05)  # epoch 0

    cls_targets = Recorder(ibot.dino_teacher_targets)
    patch_targets = Recorder(ibot.ibot_patch_targets)
    monkeypatch.setattr(ibot, "dino_teacher_targets", cls_targets)
    monkeypatch.setattr(ibot, "ibot_patch_targets", patch_targets)
    model = tiny_ibot(teacher_temp_per_step=True, warmup_teacher_temp_epochs=1, optimizer="sgd", lr=0.1)
    quick_trainer(max_epochs=2, limit_val_batches=0).fit(model, fake_loader(batch_size=4, length=16))  # 4 steps/epoch
    # DINOv2: np.linspace(0.04, 0.07, 4) over the first epoch's steps, then 0.07; the patches' the same
    expected = [0.04, 0.05, 0.06, 0.07, 0.07, 0.07, 0.07, 0.07]
    assert [call[1] for call in cls_targets.calls] == pytest.approx(expected)
    assert [call[1] for call in patch_targets.calls] == pytest.approx(expected)


# ---------------------------------------------------------------- fits


class TeacherFollowsByEMA(L.Callback):
    """The teacher after each step against m * its previous weights + (1 - m) * the student's new ones."""

    def __init__(self):
        self.errors, self.moved = [], []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.before = {k: v.clone() for k, v in module.teacher.module.state_dict().items()}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        step = trainer.global_step - 1
        m = module.teacher.momentum(step, int(trainer.estimated_stepping_batches))
        student = module._online_network().state_dict()
        for key, value in module.teacher.module.state_dict().items():
            if value.is_floating_point():
                expected = m * self.before[key] + (1 - m) * student[key]
                self.errors.append((value - expected).abs().max().item())
                self.moved.append(not torch.equal(value, self.before[key]))


@pytest.mark.parametrize("shared_head, centering", [(True, "centre"), (False, "sinkhorn_knopp")])
def test_short_fit_logs_its_terms_and_the_teacher_follows_by_ema(shared_head, centering):
    model = tiny_ibot(False, in_chans=None, num_classes=None, batch_size=None, shared_head=shared_head, centering=centering,
                      koleo_weight=0.1, optimizer="adamw", lr=1e-3, warmup_epochs=0.0, base_momentum=0.9)
    ema = TeacherFollowsByEMA()
    views = [ViewSpec(num=2, crop_scale=(0.4, 1.0)), ViewSpec(num=2, crop_size=8, crop_scale=(0.05, 0.4))]
    trainer = quick_trainer(max_steps=3, limit_val_batches=0, log_every_n_steps=1, callbacks=[ema])
    trainer.fit(model, Digits(batch_size=16, num_workers=0, image_size=16, views=views))
    metrics = trainer.callback_metrics
    for term in ("train/loss", "train/loss/cls", "train/loss/patch", "train/loss/koleo"):
        assert torch.isfinite(metrics[term]), term
    assert max(ema.errors) < 1e-6 and any(ema.moved)


def test_the_backbone_exports_as_a_plain_timm_vit_and_the_last_layers_freeze_in_epoch_zero():
    model = tiny_ibot(shared_head=False, optimizer="sgd", lr=0.5, warmup_epochs=0.0)
    last_layers = [model.projector.last_layer.weight.clone(), model.patch_projector.last_layer.weight.clone()]
    mask_token = model.mask_token.detach().clone()
    quick_trainer(max_steps=2, limit_val_batches=0).fit(model, fake_loader(batch_size=8, length=16))
    assert torch.equal(model.projector.last_layer.weight, last_layers[0])  # epoch 0: iBOT freezes every last layer
    assert torch.equal(model.patch_projector.last_layer.weight, last_layers[1])
    assert not torch.equal(model.mask_token, mask_token)  # the mask token trains
    plain = timm.create_model(TINY_DYNAMIC_VIT["backbone"], num_classes=0, in_chans=1, **TINY_DYNAMIC_VIT["backbone_kwargs"])
    plain.load_state_dict(model.backbone.state_dict(), strict=True)
    images = torch.randn(2, 1, 16, 16)
    torch.testing.assert_close(plain.eval()(images), model.backbone.eval()(images))


# ---------------------------------------------------------------- bad input


def test_a_backbone_without_patch_tokens_is_refused_naming_it():
    model = IBOT(**TINY_BACKBONE, **SMALL, in_chans=1)
    with pytest.raises(ValueError, match=r"IBOT masks patch tokens.*'resnet18' \(ResNet\) has no patch tokens"):
        model.configure_model()


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="0 <= mask_probability <= 1"):
        IBOT(mask_probability=1.5)
    with pytest.raises(ValueError, match="koleo_weight >= 0"):
        IBOT(koleo_weight=-0.1)
    with pytest.raises(ValueError, match="use_bn_in_head: false"):
        IBOT(use_bn_in_head=True)
    with pytest.raises(ValueError, match="patch_out_dim=512 sizes a separate patch head; set shared_head: false"):
        IBOT(patch_out_dim=512)
    with pytest.raises(ValueError, match="unknown centering 'mean'"):
        IBOT(centering="mean")
