"""Device-side views: torchvision v2's parameter distributions (KS tests), torchvision's pixels for
identical parameters, batch shapes, and the DataModule hook in a real fit."""

import math

import lightning as L
import pytest
import torch
from scipy.stats import ks_2samp
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from ssl_lightning.datamodules import Digits
from ssl_lightning.datamodules import device_views as dv
from ssl_lightning.datamodules.device_params import (
    sample_crop_boxes,
    sample_jitter,
    sample_mask,
    sample_padded_crop_boxes,
    sample_sigma,
)
from ssl_lightning.datamodules.views import resolve_views
from ssl_lightning.methods import SimCLR

from helpers.fakes import TINY_BACKBONE

DRAWS = 4000
P_MIN = 1e-3


def _box_stats(boxes: torch.Tensor, height: int, width: int) -> dict[str, torch.Tensor]:
    top, left, h, w = boxes.double().unbind(1)
    return {
        "area": h * w / (height * width),
        "log_ratio": (w / h).log(),
        "centre_y": (top + h / 2) / height,
        "centre_x": (left + w / 2) / width,
    }


# A square image, a wide one (the central-crop fallback is frequent) and DINO's local-crop scale.
@pytest.mark.parametrize("height,width,scale", [(32, 32, (0.08, 1.0)), (12, 60, (0.08, 1.0)), (96, 64, (0.05, 0.4))])
def test_crop_boxes_follow_torchvision_random_resized_crop(height, width, scale):
    torch.manual_seed(0)
    crop = v2.RandomResizedCrop(8, scale=scale)
    image = torch.zeros(1, height, width, dtype=torch.uint8)
    reference = torch.tensor(
        [[p["top"], p["left"], p["height"], p["width"]] for p in (crop.make_params([image]) for _ in range(DRAWS))]
    )
    ours = sample_crop_boxes(DRAWS, height, width, scale, generator=torch.Generator().manual_seed(1))
    assert ours.shape == (DRAWS, 4)
    assert (ours[:, 0] >= 0).all() and (ours[:, 0] + ours[:, 2] <= height).all()
    assert (ours[:, 1] >= 0).all() and (ours[:, 1] + ours[:, 3] <= width).all()
    expected, got = _box_stats(reference, height, width), _box_stats(ours, height, width)
    for name in expected:
        assert ks_2samp(expected[name].numpy(), got[name].numpy()).pvalue > P_MIN, name


def test_padded_crop_offsets_are_uniform_like_torchvision_random_crop():
    boxes = sample_padded_crop_boxes(DRAWS, 32, 32, 32, 4, generator=torch.Generator().manual_seed(0))
    assert (boxes[:, 2:] == 32).all()
    for offsets in (boxes[:, 0], boxes[:, 1]):
        counts = torch.bincount(offsets.long(), minlength=9)
        assert len(counts) == 9 and (counts > 0).all()  # 0..8: every offset of a 40-px padded image
        expected = torch.randint(0, 9, (DRAWS,), generator=torch.Generator().manual_seed(1))
        assert ks_2samp(offsets.numpy(), expected.numpy()).pvalue > P_MIN


def test_a_padded_device_view_is_the_window_of_the_zero_padded_image_its_box_names():
    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    (spec,) = resolve_views([dv.ViewSpec(crop_padding=3, jitter_p=0.0, grayscale_p=0.0)], 16, 3)
    params = dv.sample_view_params(6, 16, 16, spec, torch.device("cpu"), torch.Generator().manual_seed(0))
    views = dv.draw_views(images, params, spec, torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1), blend=False)
    padded = torch.nn.functional.pad(images.float() / 255, (3, 3, 3, 3))
    for view, (top, left, _, _), flip, image in zip(views, params["boxes"].long().tolist(), params["flip"], padded):
        window = image[:, top:top + 16, left:left + 16]
        # bilinear sampling at exact pixel centres, up to grid_sample's coordinate rounding
        torch.testing.assert_close(view, window.flip(-1) if flip else window, rtol=0, atol=1e-5)


def test_jitter_factors_and_order_follow_torchvision_color_jitter():
    torch.manual_seed(0)
    jitter = v2.ColorJitter(0.4, 0.4, 0.2, 0.1)
    image = torch.zeros(3, 4, 4)
    params = [jitter.make_params([image]) for _ in range(DRAWS)]
    names = ("brightness_factor", "contrast_factor", "saturation_factor", "hue_factor")
    reference = torch.tensor([[p[name] for name in names] for p in params])
    reference_order = torch.stack([p["fn_idx"] for p in params])
    factors, order = sample_jitter(DRAWS, 0.4, 0.4, 0.2, 0.1, generator=torch.Generator().manual_seed(1))
    for column, name in enumerate(names):
        assert ks_2samp(reference[:, column].numpy(), factors[:, column].numpy()).pvalue > P_MIN, name
    assert (order.sort(1).values == torch.arange(4)).all(), "each row is a permutation"
    for op in range(4):  # the slot each op lands in
        slot_ref = (reference_order == op).int().argmax(1).numpy()
        slot_ours = (order == op).int().argmax(1).numpy()
        assert ks_2samp(slot_ref, slot_ours).pvalue > P_MIN, op


def test_blur_sigma_and_masks_follow_torchvision():
    torch.manual_seed(0)
    blur = v2.GaussianBlur(5, sigma=(0.1, 2.0))
    reference = torch.tensor([blur.make_params([torch.zeros(1, 4, 4)])["sigma"][0] for _ in range(DRAWS)])
    ours = sample_sigma(DRAWS, (0.1, 2.0), generator=torch.Generator().manual_seed(1))
    assert ks_2samp(reference.numpy(), ours.numpy()).pvalue > P_MIN
    applied = sample_mask(DRAWS, 0.2, generator=torch.Generator().manual_seed(2)).double().mean().item()
    assert abs(applied - 0.2) < 4 * math.sqrt(0.2 * 0.8 / DRAWS)


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(16, 3, 40, 48, generator=torch.Generator().manual_seed(0))


def test_crop_resize_equals_torchvision_resized_crop_without_antialias(images):
    boxes = torch.tensor([[3.0, 5.0, 20.0, 30.0], [0.0, 0.0, 40.0, 48.0], [10.0, 7.0, 9.0, 13.0]]).repeat(6, 1)[:16]
    flip = torch.arange(16) % 2 == 0
    ours = dv.crop_resize(images, boxes, 24, flip)
    for i, (top, left, h, w) in enumerate(boxes.int().tolist()):
        reference = TF.resized_crop(images[i], top, left, h, w, [24, 24], antialias=False)
        reference = TF.horizontal_flip(reference) if flip[i] else reference
        assert torch.allclose(ours[i], reference, atol=1e-5)


def test_jitter_ops_equal_torchvision_for_identical_factors(images):
    factor = torch.linspace(0.6, 1.4, len(images))
    for ours, reference in [
        (dv.adjust_brightness, TF.adjust_brightness),
        (dv.adjust_contrast, TF.adjust_contrast),
        (dv.adjust_saturation, TF.adjust_saturation),
    ]:
        expected = torch.stack([reference(image, float(f)) for image, f in zip(images, factor)])
        assert torch.allclose(ours(images.clone(), factor), expected, atol=1e-6), ours.__name__
    gray = torch.stack([TF.rgb_to_grayscale(image, num_output_channels=3) for image in images])
    assert torch.allclose(dv.to_gray(images).expand_as(images), gray, atol=1e-6)
    one_channel = images[:, :1]
    expected = torch.stack([TF.adjust_contrast(image, float(f)) for image, f in zip(one_channel, factor)])
    assert torch.allclose(dv.adjust_contrast(one_channel.clone(), factor), expected, atol=1e-6)


@pytest.mark.parametrize("blend", [False, True])
def test_color_jitter_applies_each_samples_order(images, blend):
    factors, order = sample_jitter(len(images), 0.4, 0.4, 0.4, 0.1, generator=torch.Generator().manual_seed(3))
    reference_ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    expected = []
    for image, f, o in zip(images, factors, order):
        for op in o.tolist():
            image = reference_ops[op](image, float(f[op]))
        expected.append(image)
    assert torch.allclose(dv.color_jitter(images, factors, order, blend=blend), torch.stack(expected), atol=1e-5)


@pytest.mark.parametrize("channels", [3, 1])
def test_blended_jitter_is_bit_for_bit_each_op_blended_in_turn(images, channels):
    # The blended jitter folds brightness, contrast and saturation into one affine step per slot.
    images = images[:, :channels]
    factors, order = sample_jitter(len(images), 0.4, 0.4, 0.4, 0.1, generator=torch.Generator().manual_seed(5))
    expected = images
    for slot in range(4):
        for op_index, op in enumerate(dv.JITTER_OPS):
            chosen = (order[:, slot] == op_index).view(-1, 1, 1, 1)
            expected = torch.where(chosen, op(expected.clone(), factors[:, op_index]), expected)
    assert torch.equal(dv.color_jitter(images, factors, order, blend=True), expected)


def test_hue_equals_torchvision_hsv_shift_including_grey_and_tied_pixels(images):
    images = images.clone()
    images[:3] = images[:3, :1]  # grey pixels: hue 0, saturation 0
    images[3:6] = (images[3:6] * 4).round() / 4  # channels tied for the maximum
    factor = torch.linspace(-0.5, 0.5, len(images))
    expected = torch.stack([TF.adjust_hue(image, float(f)) for image, f in zip(images, factor)])
    assert torch.allclose(dv.adjust_hue(images, factor), expected, atol=1e-5)
    assert torch.equal(dv.adjust_hue(images[:, :1], factor), images[:, :1])


def test_blur_and_solarize_equal_torchvision(images):
    sigma = torch.linspace(0.1, 2.0, len(images))
    expected = torch.stack([TF.gaussian_blur(image, [5, 5], [float(s)] * 2) for image, s in zip(images, sigma)])
    assert torch.allclose(dv.gaussian_blur(images, sigma, 5), expected, atol=1e-5)
    pixels = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    solarized = (dv.solarize(pixels.float() / 255) * 255).round().to(torch.uint8)
    assert torch.equal(solarized, TF.solarize(pixels, 128))


@pytest.mark.parametrize("preset,in_chans", [("simclr", 3), ("byol", 1), ("dino", 3)])
def test_device_views_shapes_dtypes_and_normalisation(preset, in_chans):
    specs = resolve_views(preset, 96, in_chans)
    mean, std = (0.5,) * in_chans, (0.25,) * in_chans
    batch = torch.randint(0, 256, (6, in_chans, 96, 96), dtype=torch.uint8)
    views = dv.DeviceViews(specs, mean, std)(batch)
    assert len(views) == sum(spec.num for spec in specs)
    sizes = [spec.crop_size for spec in specs for _ in range(spec.num)]
    assert [tuple(view.shape) for view in views] == [(6, in_chans, s, s) for s in sizes]
    assert all(view.dtype == torch.float32 for view in views)
    assert all(view.min() >= -2.0 - 1e-6 and view.max() <= 2.0 + 1e-6 for view in views)  # (x - 0.5) / 0.25
    with pytest.raises(TypeError, match="uint8"):
        dv.DeviceViews(specs, mean, std)(batch.float())


def test_device_views_reject_unresolved_or_plain_specs():
    with pytest.raises(ValueError, match="resolved"):
        dv.DeviceViews(resolve_views("none", 32, 1), (0.5,), (0.25,))


class RecordBatchKeys(L.Callback):
    def __init__(self) -> None:
        self.train, self.val = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.train.append((sorted(batch), [tuple(v.shape) for v in batch["views"]], batch["views"][0].dtype))

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.val.append(sorted(batch))


def _simclr() -> SimCLR:
    return SimCLR(proj_hidden_dim=32, proj_dim=16, optimizer="adamw", lr=1e-3, warmup_steps=0, **TINY_BACKBONE)


def test_digits_with_device_views_fit_simclr_for_two_steps():
    data = Digits(batch_size=16, num_workers=0, view_device="device")
    data.setup("fit")
    loaded = next(iter(data.train_dataloader()))
    assert "views" not in loaded and loaded["image"].dtype == torch.uint8
    assert loaded["image"].shape == (16, 1, 32, 32)

    record = RecordBatchKeys()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=2, limit_val_batches=1, callbacks=[record], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(_simclr(), data)
    assert trainer.global_step == 2
    assert record.train == [(["index", "label", "views"], [(16, 1, 32, 32)] * 2, torch.float32)] * 2
    assert record.val and all(keys == ["index", "label", "views"] for keys in record.val)


def test_a_method_given_image_batches_says_the_view_hook_did_not_run():
    data = Digits(batch_size=16, num_workers=0, view_device="device")
    data.setup("fit")
    trainer = L.Trainer(
        accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = _simclr()
    model.hparams.update(in_chans=1, batch_size=16)  # what the DataModule would have told it
    with pytest.raises(RuntimeError, match="view hook"):
        trainer.fit(model, train_dataloaders=data.train_dataloader())


def test_blending_the_chosen_samples_gives_the_pixels_of_indexing_them():
    # Accelerators blend with torch.where (no host sync); the CPU indexes. Same parameters, same pixels.
    images = torch.randint(0, 256, (64, 3, 24, 24), dtype=torch.uint8).float() / 255
    spec = resolve_views("byol", 16, 3)[1]  # jitter p 0.8, blur p 0.1, solarize p 0.2: partial choices
    params = dv.sample_view_params(64, 24, 24, spec, images.device, torch.Generator().manual_seed(0))
    indexed = dv.render_view(images, params, spec, blend=False)
    blended = dv.render_view(images, params, spec, blend=True)
    torch.testing.assert_close(blended, indexed, atol=1e-6, rtol=0)
