"""View recipes: preset values from the papers, resolution rules, and the CPU transforms' outputs."""

import pytest
import torch

from ssl_lightning.datamodules import VIEW_PRESETS, ViewSpec
from ssl_lightning.datamodules.views import MultiViewTransform, blur_kernel_size, resolve_views

MEAN3, STD3 = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


@pytest.mark.parametrize(
    ("preset", "expected"), [("simclr", 2), ("byol", 2), ("dino", 8), ("supervised", 1), ("none", 1)]
)
def test_each_preset_has_the_papers_number_of_views(preset, expected):
    assert sum(spec.num for spec in resolve_views(preset, 32, 3)) == expected


def test_preset_names_are_exactly_the_five_documented_ones():
    assert list(VIEW_PRESETS) == ["simclr", "byol", "dino", "supervised", "none"]


def test_supervised_view_is_cifars_padded_crop_below_64_px_and_a_random_resized_crop_from_it():
    (small,), (large,) = resolve_views("supervised", 32, 3), resolve_views("supervised", 224, 3)
    assert (small.crop_size, small.crop_padding, small.flip_p) == (32, 4, 0.5)
    assert (large.crop_size, large.crop_padding, large.crop_scale, large.flip_p) == (224, 0, (0.08, 1.0), 0.5)
    for spec in (small, large):
        assert (spec.jitter_p, spec.grayscale_p, spec.blur_p, spec.solarize_p) == (0.0, 0.0, 0.0, 0.0)


def test_a_padded_crop_is_a_window_of_the_zero_padded_image():
    torch.manual_seed(0)
    image = torch.randint(1, 256, (3, 16, 16), dtype=torch.uint8)  # no zero pixel: padding shows
    spec = resolve_views([ViewSpec(crop_padding=2, flip_p=0.0, jitter_p=0.0, grayscale_p=0.0)], 16, 3)
    padded = torch.nn.functional.pad(image.float() / 255, (2, 2, 2, 2))
    offsets = [(top, left) for top in range(5) for left in range(5)]
    windows = torch.stack([padded[:, top:top + 16, left:left + 16] for top, left in offsets])
    transform = MultiViewTransform(spec, mean=(0.0,) * 3, std=(1.0,) * 3)
    # a given offset is missed with probability (24/25)^400 < 1e-7
    views = torch.stack([transform(image)[0] for _ in range(400)])
    distance = (views[:, None] - windows[None]).abs().flatten(2).amax(2)  # [view, offset]
    assert (distance.min(1).values < 1e-6).all()  # each view is exactly one window...
    seen = {offsets[i] for i in distance.argmin(1).tolist()}
    assert seen == set(offsets)  # ...and every offset of torchvision's RandomCrop(16, padding=2), nothing else


def test_simclr_uses_strength_half_jitter_and_blur_only_on_large_images():
    small, large = resolve_views("simclr", 32, 3)[0], resolve_views("simclr", 224, 3)[0]
    assert (small.brightness, small.contrast, small.saturation, small.hue) == (0.4, 0.4, 0.4, 0.1)
    assert (small.jitter_p, small.grayscale_p, small.flip_p, small.crop_scale) == (0.8, 0.2, 0.5, (0.08, 1.0))
    assert (small.blur_p, large.blur_p, large.solarize_p) == (0.0, 0.5, 0.0)


def test_byol_views_are_asymmetric_in_blur_and_solarize():
    first, second = resolve_views("byol", 224, 3)
    assert (first.blur_p, first.solarize_p, second.blur_p, second.solarize_p) == (1.0, 0.0, 0.1, 0.2)
    assert (first.brightness, first.contrast, first.saturation, first.hue, first.jitter_p) == (0.4, 0.4, 0.2, 0.1, 0.8)
    small_first, small_second = resolve_views("byol", 32, 3)
    assert (small_first.blur_p, small_second.blur_p, small_second.solarize_p) == (0.0, 0.0, 0.2)


def test_dino_has_two_global_and_six_local_crops_at_96_over_224():
    global_1, global_2, local = resolve_views("dino", 224, 3)
    assert (global_1.crop_size, global_2.crop_size, local.crop_size, local.num) == (224, 224, 96, 6)
    assert global_1.crop_scale == global_2.crop_scale == (0.4, 1.0) and local.crop_scale == (0.05, 0.4)
    assert (global_1.blur_p, global_2.blur_p, global_2.solarize_p, local.blur_p) == (1.0, 0.1, 0.2, 0.5)
    assert resolve_views("dino", 32, 3)[2].crop_size == 14  # round(32 * 96 / 224)


@pytest.mark.parametrize("preset", list(VIEW_PRESETS))
def test_grayscale_images_get_no_saturation_hue_or_grayscale(preset):
    for spec in resolve_views(preset, 32, in_chans=1):
        assert spec.crop_scale is None or (spec.saturation, spec.hue, spec.grayscale_p) == (0.0, 0.0, 0.0)


def test_unknown_preset_error_lists_the_valid_ones():
    valid = "simclr, byol, dino, supervised, none"
    with pytest.raises(ValueError, match=f"unknown view preset 'simclrr'; valid presets: {valid}"):
        resolve_views("simclrr", 32, 3)


def test_custom_views_must_put_global_crops_first():
    with pytest.raises(ValueError, match=r"global \(largest\) crops first.*\[16, 32\]"):
        resolve_views([ViewSpec(crop_size=16), ViewSpec()], 32, 3)


def test_view_spec_rejects_impossible_values():
    with pytest.raises(ValueError, match="blur_p"):
        ViewSpec(blur_p=1.5)
    with pytest.raises(ValueError, match="crop_scale"):
        ViewSpec(crop_scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="num"):
        ViewSpec(num=0)
    with pytest.raises(ValueError, match="crop_padding must be >= 0"):
        ViewSpec(crop_padding=-1)
    with pytest.raises(ValueError, match="crop_padding needs an augmenting view"):
        ViewSpec(crop_padding=4, crop_scale=None)


@pytest.mark.parametrize(("crop", "kernel"), [(14, 3), (32, 3), (96, 11), (224, 23)])
def test_blur_kernel_is_about_a_tenth_of_the_crop_and_odd(crop, kernel):
    assert blur_kernel_size(crop) == kernel


def test_multi_view_transform_gives_float_views_of_the_recipe_sizes_from_a_non_square_uint8_image():
    image = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8)
    views = MultiViewTransform(resolve_views("dino", 32, 3), MEAN3, STD3)(image)
    assert [tuple(view.shape) for view in views] == [(3, 32, 32)] * 2 + [(3, 14, 14)] * 6
    assert all(view.dtype == torch.float32 for view in views)


def test_augmented_views_of_one_image_differ():
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    first, second = MultiViewTransform(resolve_views("simclr", 32, 3), MEAN3, STD3)(image)
    assert not torch.equal(first, second)


def test_plain_view_is_the_normalised_image():
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    (view,) = MultiViewTransform(resolve_views("none", 32, 3), MEAN3, STD3)(image)
    expected = (image.float() / 255 - torch.tensor(MEAN3)[:, None, None]) / torch.tensor(STD3)[:, None, None]
    torch.testing.assert_close(view, expected)


def test_plain_view_resizes_the_shorter_side_and_centre_crops():
    image = torch.randint(0, 256, (1, 20, 30), dtype=torch.uint8)
    (view,) = MultiViewTransform(resolve_views("none", 16, 1), (0.5,), (0.5,))(image)
    assert view.shape == (1, 16, 16)


def test_solarize_inverts_pixels_from_half_the_uint8_range():
    image = torch.tensor([[[0, 127], [128, 255]]], dtype=torch.uint8)
    spec = ViewSpec(crop_size=2, crop_scale=(1.0, 1.0), flip_p=0, jitter_p=0, grayscale_p=0, solarize_p=1.0)
    (view,) = MultiViewTransform([spec], (0.0,), (1.0,))(image)
    torch.testing.assert_close(view, torch.tensor([[[0, 127], [127, 0]]]) / 255.0)
