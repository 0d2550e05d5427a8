"""The 15 regenerated ImageNet-C / CIFAR-10-C corruptions: registry, determinism, uint8 contract, the
15 x 5 grid, severity ordering per corruption, bad input, and each torch operation against an
independent reference (scipy where the scripts used scipy, plain loops for ImageMagick and the
pixel-shuffle loop, matplotlib's HSV for scikit-image's)."""

import math

import numpy as np
import pytest
import torch

from ssl_lightning.datamodules import corruption_ops as ops
from ssl_lightning.datamodules.corruption_constants import CIFAR
from ssl_lightning.datamodules.corruptions import CORRUPTIONS, constants_for_size, corrupt
from ssl_lightning.datamodules.frost_textures import frost_textures

from helpers.threads import one_thread  # noqa: F401 (autouse: one intra-op thread)

BENCHMARK_ORDER = [
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
]
#: corruptions without random draws: the seed changes nothing
DETERMINISTIC = {"defocus_blur", "zoom_blur", "brightness", "contrast", "pixelate", "jpeg_compression"}


def natural_images(count, size=32, seed=0, channels=3):
    """Images with the 1/f amplitude spectrum of natural images (a field shared by the channels plus
    a weaker one per channel), stretched to 0-255: edges and texture at every scale, as photographs."""
    generator = torch.Generator().manual_seed(seed)
    freq = torch.fft.fftfreq(size).abs()
    radius = torch.sqrt(freq[:, None] ** 2 + freq[None, :] ** 2).clamp_min(1.0 / size)
    phases = torch.rand(count, channels + 1, size, size, generator=generator) * 2 * math.pi
    fields = torch.fft.ifft2(torch.polar(1.0 / radius, phases)).real
    x = fields[:, :1] + 0.5 * fields[:, 1:]
    low, high = x.amin((1, 2, 3), keepdim=True), x.amax((1, 2, 3), keepdim=True)
    return ((x - low) / (high - low) * 255).round().to(torch.uint8)


def coordinate_ramps(count, size=32):
    """Red = column, green = row (0-255 across the image): a warp's output tells where it sampled."""
    rows, cols = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    image = torch.stack([cols / (size - 1), rows / (size - 1), torch.full_like(rows, 0.5)])
    return (image * 255).round().to(torch.uint8).expand(count, 3, size, size).contiguous()


@pytest.fixture(scope="module")
def images():
    return natural_images(4)


def test_registry_lists_the_benchmark_corruptions_in_its_order():
    assert list(CORRUPTIONS) == BENCHMARK_ORDER
    assert all(CORRUPTIONS[name].__name__ == name for name in CORRUPTIONS)


def test_the_15_by_5_grid_gives_uint8_images_of_the_same_shape(images):
    for name in CORRUPTIONS:
        for severity in range(1, 6):
            out = corrupt(images, name, severity, seed=3)
            assert out.dtype == torch.uint8 and out.shape == images.shape, (name, severity)
            assert not torch.equal(out, images), f"{name} at severity {severity} left the images unchanged"


@pytest.mark.parametrize("name", BENCHMARK_ORDER)
def test_grey_and_non_square_images_keep_their_shape(name):
    grey = natural_images(2, seed=5, channels=1)[..., 4:28, :]  # 2 x 1 x 24 x 32
    out = corrupt(grey, name, 3, seed=1)
    assert out.dtype == torch.uint8 and out.shape == grey.shape


@pytest.mark.parametrize("name", BENCHMARK_ORDER)
def test_each_corruption_is_deterministic_for_a_seed(images, name):
    first, again, other = (corrupt(images, name, 4, seed=seed) for seed in (7, 7, 8))
    assert torch.equal(first, again)
    if name in DETERMINISTIC:
        assert torch.equal(first, other)
    else:
        assert not torch.equal(first, other), f"{name} ignores its seed"


# Severity ordering: a statistic of (corrupted, clean) that moves one way along chains of severities.


def mse(out, clean):
    return ((out.double() - clean.double()) ** 2).mean()


def high_frequency_energy(out, clean):
    x = out.double()
    return ((x[..., 1:, :] - x[..., :-1, :]) ** 2).mean() + ((x[..., :, 1:] - x[..., :, :-1]) ** 2).mean()


def correlation(out, clean):
    a, b = out.double().flatten(1), clean.double().flatten(1)
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).mean()


def mean_brightness(out, clean):
    return out.double().mean()


def contrast_std(out, clean):
    return out.double().std((2, 3)).mean()


def non_affine_displacement(out, clean, margin=6):
    """RMS distance, in pixels, between where a warp sampled (read off coordinate ramps) and the best
    affine fit of it, away from the reflected border."""
    size = out.shape[-1]
    found = out[:, :2].double() / 255 * (size - 1)  # (column, row) sampled at each output pixel
    rows, cols = torch.meshgrid(torch.arange(size).double(), torch.arange(size).double(), indexing="ij")
    inner = slice(margin, size - margin)
    design = torch.stack([cols, rows, torch.ones_like(rows)], -1)[inner, inner].reshape(-1, 3)
    residuals = []
    for sampled in found:
        target = sampled[:, inner, inner].reshape(2, -1).T
        fit = design @ torch.linalg.lstsq(design, target).solution
        residuals.append(((fit - target) ** 2).sum(1).mean().sqrt())
    return torch.stack(residuals).mean()


ALL = [(1, 2, 3, 4, 5)]
ORDERING = {  # name: [(statistic, +1 grows / -1 falls, chains of severities, inputs)]
    "gaussian_noise": [(mse, +1, ALL, "natural")],
    "shot_noise": [(mse, +1, ALL, "natural")],
    "impulse_noise": [(mse, +1, ALL, "natural")],
    "defocus_blur": [(high_frequency_energy, -1, ALL, "natural")],
    # CIFAR glass blur trades blur against shuffling: sigma 0.05/0.25/0.4 with one pass, then 0.25/0.4
    # with two; more blur removes high frequencies, more passes move more pixels.
    "glass_blur": [
        (high_frequency_energy, -1, [(1, 2, 3), (4, 5)], "natural"),
        (mse, +1, [(2, 4), (3, 5)], "natural"),
    ],
    # (radius, sigma) = (6, 2) and (8, 2): the taps beyond radius 6 weigh exp(-36/2 ...) ~ 1e-8, so
    # severities 3 and 4 blur alike under ImageMagick's kernel (docs/corruptions.md).
    "motion_blur": [(high_frequency_energy, -1, [(1, 2, 3, 5), (1, 2, 4, 5)], "natural")],
    "zoom_blur": [(high_frequency_energy, -1, ALL, "natural")],
    "snow": [(mse, +1, ALL, "natural")],
    "frost": [(correlation, -1, ALL, "natural")],
    "fog": [(correlation, -1, ALL, "natural")],
    "brightness": [(mean_brightness, +1, ALL, "natural")],
    "contrast": [(contrast_std, -1, ALL, "natural")],
    # Severity 1 is affine only and severity 2's field (sigma 6.4 px) is near-affine over 32 px.
    "elastic_transform": [(non_affine_displacement, +1, [(1, 3, 4, 5), (2, 3, 4, 5)], "ramps")],
    "pixelate": [(mse, +1, ALL, "natural")],
    "jpeg_compression": [(mse, +1, ALL, "natural")],
}


@pytest.mark.parametrize("name", BENCHMARK_ORDER)
def test_severity_orders_a_statistic_of_the_corruption(name):
    inputs = {"natural": natural_images(8, seed=11), "ramps": coordinate_ramps(8)}
    for statistic, direction, chains, kind in ORDERING[name]:
        clean = inputs[kind]
        values = {s: float(statistic(corrupt(clean, name, s, seed=2), clean)) for s in range(1, 6)}
        for chain in chains:
            steps = [direction * (values[b] - values[a]) for a, b in zip(chain, chain[1:])]
            assert all(step > 0 for step in steps), f"{name}: {statistic.__name__} over severities {chain}: {values}"


# Bad input.


def test_unknown_name_lists_the_valid_ones(images):
    with pytest.raises(ValueError, match="unknown corruption 'gaussian'.*gaussian_noise, shot_noise"):
        corrupt(images, "gaussian", 1)


@pytest.mark.parametrize("severity", [0, 6, 2.5, True, "3"])
def test_severity_outside_1_to_5_lists_the_valid_ones(images, severity):
    with pytest.raises(ValueError, match=r"severity must be one of \[1, 2, 3, 4, 5\]"):
        corrupt(images, "contrast", severity)


@pytest.mark.parametrize(
    ("name", "severity", "side", "needed"),
    [("defocus_blur", 5, 4, 5), ("elastic_transform", 1, 2, 3), ("pixelate", 1, 1, 2), ("glass_blur", 1, 2, 3)],
)
def test_images_too_small_name_the_corruption_the_size_and_the_minimum(name, severity, side, needed):
    tiny = torch.zeros(1, 3, side, side, dtype=torch.uint8)
    message = f"{name} at severity {severity} .*at least {needed}x{needed} pixels; got {side}x{side}"
    with pytest.raises(ValueError, match=message):
        corrupt(tiny, name, severity)
    corrupt(torch.zeros(1, 3, needed, needed, dtype=torch.uint8), name, severity)  # the minimum itself works


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (torch.zeros(1, 3, 8, 8), "uint8 torch tensor"),
        (torch.zeros(3, 8, 8, dtype=torch.uint8), r"\[N, C, H, W\]"),
        (np.zeros((1, 8, 8, 3), dtype=np.uint8), "got ndarray"),
        (torch.zeros(1, 2, 8, 8, dtype=torch.uint8), "1 \\(grey\\) or 3 \\(RGB\\) channels"),
    ],
)
def test_images_other_than_uint8_nchw_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        corrupt(bad, "contrast", 1)


def test_bad_seed_and_constants_are_refused(images):
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        corrupt(images, "gaussian_noise", 1, seed=-1)
    with pytest.raises(ValueError, match="constants must be 'auto' or one of"):
        corrupt(images, "gaussian_noise", 1, constants="mnist")


def test_constants_follow_the_image_size():
    assert [constants_for_size(s) for s in (28, 32, 44, 45, 64, 96, 119, 120, 224, 512)] == [
        "cifar", "cifar", "cifar", "tiny_imagenet", "tiny_imagenet", "tiny_imagenet", "tiny_imagenet",
        "imagenet", "imagenet", "imagenet",
    ]
    x = natural_images(2, size=64)
    auto = corrupt(x, "gaussian_noise", 5, seed=1)
    assert torch.equal(auto, corrupt(x, "gaussian_noise", 5, seed=1, constants="tiny_imagenet"))
    assert not torch.equal(auto, corrupt(x, "gaussian_noise", 5, seed=1, constants="cifar"))


# Against independent references.


def test_noise_draws_have_the_published_strength():
    grey = torch.full((4, 3, 32, 32), 128, dtype=torch.uint8)  # no clipping anywhere near
    gauss = (corrupt(grey, "gaussian_noise", 5, seed=0).double() - 128) / 255
    assert gauss.std() == pytest.approx(CIFAR["gaussian_noise"][4], rel=0.03)
    rate = CIFAR["shot_noise"][4]  # Poisson(x c) / c: variance x / c
    shot = corrupt(grey, "shot_noise", 5, seed=0).double() / 255
    assert shot.std() == pytest.approx(math.sqrt(128 / 255 / rate), rel=0.05)
    impulse = corrupt(grey, "impulse_noise", 5, seed=0)
    hit = (impulse != 128).double()
    assert hit.mean() == pytest.approx(CIFAR["impulse_noise"][4], rel=0.15)
    assert set(impulse[impulse != 128].unique().tolist()) == {0, 255}
    assert (impulse == 255).double().sum() / hit.sum() == pytest.approx(0.5, abs=0.08)


def test_brightness_is_a_value_shift_in_hsv():
    colors = pytest.importorskip("matplotlib.colors")
    x = natural_images(2, seed=4)
    x[0, :, :2, :2] = 0  # black pixels: saturation 0, they turn grey
    hsv = colors.rgb_to_hsv(x.permute(0, 2, 3, 1).double().numpy() / 255)
    hsv[..., 2] = np.clip(hsv[..., 2] + CIFAR["brightness"][2], 0, 1)
    reference = (np.clip(colors.hsv_to_rgb(hsv), 0, 1) * 255).astype(np.uint8)
    out = corrupt(x, "brightness", 3).permute(0, 2, 3, 1).numpy()
    diff = np.abs(out.astype(int) - reference.astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.98  # float32 here, float64 there: a truncation may differ


def test_contrast_scales_each_channel_about_its_mean():
    x = natural_images(2, seed=6)
    clean = x.double().numpy() / 255
    means = clean.mean(axis=(2, 3), keepdims=True)
    reference = (np.clip((clean - means) * CIFAR["contrast"][1] + means, 0, 1) * 255).astype(np.uint8)
    diff = np.abs(corrupt(x, "contrast", 2).numpy().astype(int) - reference.astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.98


@pytest.mark.parametrize(
    ("mode", "scipy_mode"), [("nearest", "nearest"), ("symmetric", "reflect"), ("reflect101", "mirror")]
)
@pytest.mark.parametrize(("sigma", "truncate"), [(0.4, 4.0), (1.3, 4.0), (6.4, 3.0)])
def test_gaussian_filter_matches_scipy(mode, scipy_mode, sigma, truncate):
    ndimage = pytest.importorskip("scipy.ndimage")
    x = np.random.default_rng(0).random((2, 3, 13, 11))  # sigma 6.4 reflects more than once
    reference = np.stack(
        [[ndimage.gaussian_filter(c, sigma, mode=scipy_mode, truncate=truncate) for c in im] for im in x]
    )
    out = ops.gaussian_filter(torch.from_numpy(x), sigma, mode, truncate).numpy()
    np.testing.assert_allclose(out, reference, atol=1e-12)


def test_filter2d_is_opencv_filter2d_with_reflect101_border():
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(1)
    x, kernel = rng.random((2, 3, 9, 7)), rng.random((5, 3))
    reference = np.stack([[ndimage.correlate(c, kernel, mode="mirror") for c in im] for im in x])
    out = ops.filter2d(torch.from_numpy(x), torch.from_numpy(kernel)).numpy()
    np.testing.assert_allclose(out, reference, atol=1e-12)


def full_disk_kernel(radius, alias_blur):
    """make_cifar_c.py's disk() written out: the 17x17 disk, then a 3x3 Gaussian with OpenCV's border."""
    grid = np.arange(-8, 9)
    xs, ys = np.meshgrid(grid, grid)
    disk = (xs**2 + ys**2 <= radius**2).astype(np.float64)
    disk /= disk.sum()
    taps = np.exp(-np.array([-1.0, 0.0, 1.0]) ** 2 / (2 * alias_blur**2))
    taps /= taps.sum()
    padded = np.pad(disk, 1, mode="reflect")  # numpy "reflect" is OpenCV's BORDER_REFLECT_101
    blurred = np.zeros_like(disk)
    for i in range(17):
        for j in range(17):
            blurred[i, j] = sum(taps[a] * taps[b] * padded[i + a, j + b] for a in range(3) for b in range(3))
    return blurred


@pytest.mark.parametrize(("radius", "alias_blur"), CIFAR["defocus_blur"])
def test_disk_kernel_is_the_scripts_kernel_without_its_zero_rim(radius, alias_blur):
    full = full_disk_kernel(radius, alias_blur)
    kernel = ops.disk_kernel(radius, alias_blur).double().numpy()
    side = kernel.shape[0]
    start = (17 - side) // 2
    np.testing.assert_allclose(kernel, full[start : start + side, start : start + side], rtol=1e-6, atol=1e-12)
    rim = full.copy()
    rim[start : start + side, start : start + side] = 0
    assert not rim.any()


def test_motion_blur_matches_imagemagicks_loop():
    """MotionBlurImage as effect.c writes it: one-sided Gaussian taps along the angle, edge pixels."""
    rng = np.random.default_rng(2)
    image, radius, sigma = rng.random((2, 7, 9)) * 255, 3, 1.5
    angles = [-37.0, 20.0]
    width = 2 * math.ceil(radius) + 1
    weights = np.exp(-np.arange(width) ** 2 / (2 * sigma**2))
    weights /= weights.sum()
    reference = np.zeros((2, 2, 7, 9))
    for n, angle in enumerate(angles):
        px, py = width * math.sin(math.radians(angle)), width * math.cos(math.radians(angle))
        for i in range(width):
            dx = math.ceil(i * py / math.hypot(px, py) - 0.5)
            dy = math.ceil(i * px / math.hypot(px, py) - 0.5)
            for y in range(7):
                for x in range(9):
                    reference[n, :, y, x] += weights[i] * image[:, min(max(y + dy, 0), 6), min(max(x + dx, 0), 8)]
    batch = torch.from_numpy(image).expand(2, 2, 7, 9)
    out = ops.motion_blur(batch, radius, sigma, torch.tensor(angles))
    np.testing.assert_allclose(out.numpy(), reference, atol=1e-9)


@pytest.mark.parametrize("factor", [1.03, 1.17, 1.25, 2.25])
def test_clipped_zoom_matches_the_scripts_scipy_zoom(factor):
    ndimage = pytest.importorskip("scipy.ndimage")
    image = np.random.default_rng(3).random((11, 11, 3))
    crop = math.ceil(11 / factor)
    top = (11 - crop) // 2
    zoomed = ndimage.zoom(image[top : top + crop, top : top + crop], (factor, factor, 1), order=1)
    trim = (zoomed.shape[0] - 11) // 2
    reference = zoomed[trim : trim + 11, trim : trim + 11]
    out = ops.clipped_zoom(torch.from_numpy(image.transpose(2, 0, 1).copy())[None], factor)[0].numpy()
    np.testing.assert_allclose(out.transpose(1, 2, 0), reference, atol=1e-12)


def test_plasma_fractal_is_the_scripts_diamond_square():
    """The scripts' numpy code (FLHerne/mapgen) fed the same uniform draws as the torch version."""
    mapsize, decay, seed = 16, 2.5, 9
    draws = torch.Generator().manual_seed(seed)
    maparray = np.zeros((mapsize, mapsize))
    stepsize, wibble = mapsize, 100.0

    def wibbledmean(array):
        uniform = torch.rand(array.shape, generator=draws, dtype=torch.float64).numpy() * 2 * wibble - wibble
        return array / 4 + wibble * uniform

    while stepsize >= 2:
        cornerref = maparray[0:mapsize:stepsize, 0:mapsize:stepsize]
        squareaccum = cornerref + np.roll(cornerref, shift=-1, axis=0)
        squareaccum += np.roll(squareaccum, shift=-1, axis=1)
        maparray[stepsize // 2 : mapsize : stepsize, stepsize // 2 : mapsize : stepsize] = wibbledmean(squareaccum)
        drgrid = maparray[stepsize // 2 : mapsize : stepsize, stepsize // 2 : mapsize : stepsize]
        ulgrid = maparray[0:mapsize:stepsize, 0:mapsize:stepsize]
        ltsum = drgrid + np.roll(drgrid, 1, axis=0) + ulgrid + np.roll(ulgrid, -1, axis=1)
        maparray[0:mapsize:stepsize, stepsize // 2 : mapsize : stepsize] = wibbledmean(ltsum)
        ttsum = drgrid + np.roll(drgrid, 1, axis=1) + ulgrid + np.roll(ulgrid, -1, axis=0)
        maparray[stepsize // 2 : mapsize : stepsize, 0:mapsize:stepsize] = wibbledmean(ttsum)
        stepsize //= 2
        wibble /= decay
    maparray -= maparray.min()
    reference = maparray / maparray.max()
    out = ops.plasma_fractal(1, mapsize, decay, torch.Generator().manual_seed(seed))[0].numpy()
    np.testing.assert_allclose(out, reference, atol=1e-12)


def test_affine_warp_is_opencv_warp_affine_with_reflect101_border():
    ndimage = pytest.importorskip("scipy.ndimage")
    x = np.random.default_rng(4).random((2, 3, 13, 11))
    forward = np.array([[1.05, 0.1, -1.2], [-0.07, 0.97, 0.8]])  # (x, y) = (column, row), as cv2
    inverse = np.linalg.inv(np.vstack([forward, [0, 0, 1]]))[:2]
    matrix = inverse[:, :2][::-1, ::-1].copy()  # scipy maps (row, column)
    offset = inverse[::-1, 2].copy()
    reference = np.stack(
        [[ndimage.affine_transform(c, matrix, offset, order=1, mode="mirror") for c in im] for im in x]
    )
    out = ops.affine_warp(torch.from_numpy(x), torch.from_numpy(forward)[None].expand(2, 2, 3))
    np.testing.assert_allclose(out.numpy(), reference, atol=1e-12)


def test_displace_is_map_coordinates_with_reflect_border():
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(5)
    x, shift = rng.random((2, 3, 13, 11)), rng.uniform(-4, 4, (2, 2, 13, 11))
    rows, cols = np.meshgrid(np.arange(13), np.arange(11), indexing="ij")
    reference = np.stack([
        [ndimage.map_coordinates(c, [rows + shift[n, 1], cols + shift[n, 0]], order=1, mode="reflect") for c in im]
        for n, im in enumerate(x)
    ])
    out = ops.displace(torch.from_numpy(x), torch.from_numpy(shift))
    np.testing.assert_allclose(out.numpy(), reference, atol=1e-12)


def sequential_glass_shuffle(side, max_delta, rng):
    """make_cifar_c.py's loop on an image of pixel ids."""
    ids = np.arange(side * side).reshape(side, side)
    for h in range(side - max_delta, max_delta, -1):
        for w in range(side - max_delta, max_delta, -1):
            dx, dy = rng.integers(-max_delta, max_delta, size=2)
            ids[h, w], ids[h + dy, w + dx] = ids[h + dy, w + dx], ids[h, w]
    return ids


def displacement_stats(ids, side):
    rows, cols = np.divmod(np.asarray(ids).reshape(-1, side, side), side)
    here_rows, here_cols = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    distance = np.abs(here_rows - rows) + np.abs(here_cols - cols)
    return (distance > 0).mean(), distance.mean()


@pytest.mark.parametrize("max_delta", [1, 2])
def test_vectorised_glass_shuffle_moves_pixels_like_the_scripts_loop(max_delta):
    side, count = 32, 12
    rng = np.random.default_rng(0)
    loops = [sequential_glass_shuffle(side, max_delta, rng) for _ in range(count)]
    loop_moved, loop_distance = displacement_stats(loops, side)
    ids = torch.arange(side * side, dtype=torch.float64).view(1, 1, side, side).expand(count, 3, side, side)
    shuffled = ops.swap_nearby_pixels(ids, max_delta, torch.Generator().manual_seed(0))
    assert torch.equal(shuffled[:, 0], shuffled[:, 2])  # channels move together
    # a permutation: values only move
    assert torch.equal(shuffled[:, 0].flatten(1).sort(1).values, ids[:, 0].flatten(1))
    moved, distance = displacement_stats(shuffled[:, 0].long().numpy(), side)
    assert moved == pytest.approx(loop_moved, abs=0.02)
    assert distance == pytest.approx(loop_distance, rel=0.06)


def test_pixelate_and_jpeg_are_pillows_box_resize_and_jpeg_codec():
    from io import BytesIO

    from PIL import Image

    x = natural_images(2, seed=8)
    for n in range(2):
        pil = Image.fromarray(x[n].permute(1, 2, 0).numpy())
        small = pil.resize((int(32 * CIFAR["pixelate"][4]),) * 2, Image.BOX).resize((32, 32), Image.BOX)
        assert np.array_equal(corrupt(x, "pixelate", 5)[n].permute(1, 2, 0).numpy(), np.asarray(small))
        buffer = BytesIO()
        pil.save(buffer, "JPEG", quality=CIFAR["jpeg_compression"][4])
        jpeg = corrupt(x, "jpeg_compression", 5)[n].permute(1, 2, 0).numpy()
        assert np.array_equal(jpeg, np.asarray(Image.open(buffer)))


def test_frost_textures_are_generated_per_seed_and_blended_with_the_published_weights():
    textures = frost_textures(32, 3, 0)
    assert textures.shape == (5, 3, 192, 192)
    assert torch.equal(textures, frost_textures.__wrapped__(32, 3, 0))  # regenerated, not only cached
    assert not torch.equal(textures, frost_textures(32, 3, 1))
    assert 0 <= textures.min() and textures.max() <= 255 and 0.3 < textures.mean() / 255 < 0.7
    black = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)
    out = corrupt(black, "frost", 5, seed=0).double()  # 0.75 x + 0.45 frost: a black image shows 0.45 frost
    weight = CIFAR["frost"][4][1]
    assert out.max() <= math.floor(weight * 255) and out.mean() == pytest.approx(weight * textures.mean(), rel=0.25)


def test_imagenet_sized_frost_reads_upsampled_textures():
    image = natural_images(1, size=224, seed=2)
    out = corrupt(image, "frost", 2, seed=0)  # 1344-px texture side, drawn at 384 px
    assert out.shape == image.shape and not torch.equal(out, image)
