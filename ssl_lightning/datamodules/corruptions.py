"""The 15 corruptions of CIFAR-10-C / ImageNet-C at severities 1-5, regenerated in torch.

Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and
Perturbations", ICLR 2019; the reference is their github.com/hendrycks/robustness scripts
``make_cifar_c.py``, ``make_tinyimagenet_c.py`` and ``make_imagenet_c.py``, whose constants are in
``corruption_constants.py``. No Wand/ImageMagick, scipy, scikit-image or OpenCV: motion blur, the
filters and the warps are torch (``corruption_ops.py``), JPEG and pixelate are Pillow as in the
scripts, and frost uses generated textures (``frost_textures.py``).

Every corruption is a pure function ``f(images, severity, seed=0, constants="auto")``:

- ``images``: a uint8 torch tensor ``[N, C, H, W]`` (C = 1 or 3); computed on its device (tested on
  the CPU), Pillow-based corruptions on the CPU and returned to that device;
- ``severity``: 1-5; ``seed``: every random draw comes from ``torch.Generator(seed)`` on the
  images' device, so a call is deterministic for a seed (and a device);
- ``constants``: which script's constants, ``"auto"`` choosing by image size (``constants_for_size``);
- returns uint8 of the same shape. Like the scripts' ``np.uint8(...)``, float results are truncated,
  not rounded (ImageMagick's motion blur output is rounded, as ImageMagick writes it).

``CORRUPTIONS`` lists them in the benchmark's order; ``corrupt(images, name, severity, seed)``
dispatches by name. What differs from the published files is in docs/corruptions.md.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from ssl_lightning.datamodules import corruption_ops as ops
from ssl_lightning.datamodules.corruption_constants import CONSTANTS, FAMILIES
from ssl_lightning.datamodules.frost_textures import frost_layer

SEVERITIES = (1, 2, 3, 4, 5)
#: Image sides between the families' own sizes (32, 64, 224) go to the nearer one, on a log scale
#: (the geometric means: sqrt(32 * 64) ~ 45, sqrt(64 * 224) ~ 120).
SIZE_LIMITS = ((45, "cifar"), (120, "tiny_imagenet"))


def constants_for_size(size: int) -> str:
    """The constants family for images of this side (the smaller of H and W): ``cifar`` below 45 px
    (CIFAR's 32), ``tiny_imagenet`` below 120 px (Tiny-ImageNet's 64), ``imagenet`` from 120 px
    (ImageNet-C's 224)."""
    for limit, family in SIZE_LIMITS:
        if size < limit:
            return family
    return "imagenet"


def _float(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 255


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats -> uint8 by truncation, as ``np.uint8(np.clip(x, 0, 1) * 255)``."""
    return (x.clamp(0, 1) * 255).to(torch.uint8)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """cv2.COLOR_RGB2GRAY (ITU-R 601 weights); a one-channel image is its own grey."""
    if x.shape[1] == 1:
        return x
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * weights).sum(1, keepdim=True)


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64, device=generator.device)


# Noise.

def _gaussian_noise(images, c, generator):
    x = _float(images)
    return _to_uint8(x + c * torch.randn(x.shape, generator=generator, device=x.device))


def _shot_noise(images, c, generator):
    return _to_uint8(torch.poisson(_float(images) * c, generator=generator) / c)


def _impulse_noise(images, c, generator):
    """scikit-image's ``random_noise(mode="s&p", amount=c)``: each value (per channel) is hit with
    probability c, then set to 1 or 0 with equal odds."""
    x = _float(images)
    hit = torch.rand(x.shape, generator=generator, device=x.device) < c
    salt = torch.rand(x.shape, generator=generator, device=x.device) < 0.5
    return _to_uint8(torch.where(hit, salt.to(x.dtype), x))


# Blur.

def _defocus_blur(images, c, generator):
    radius, alias_blur = c
    return _to_uint8(ops.filter2d(_float(images), ops.disk_kernel(radius, alias_blur)))


def _glass_blur(images, c, generator):
    sigma, max_delta, iterations = c
    x = _to_uint8(ops.gaussian_filter(_float(images), sigma, mode="nearest"))
    for _ in range(iterations):
        x = ops.swap_nearby_pixels(x, max_delta, generator)
    return _to_uint8(ops.gaussian_filter(_float(x), sigma, mode="nearest"))


def _motion_blur(images, c, generator):
    radius, sigma = c
    angles = _uniform(len(images), -45, 45, generator)
    blurred = ops.motion_blur(images.float(), radius, sigma, angles)
    return blurred.round().clamp(0, 255).to(torch.uint8)


def _zoom_blur(images, c, generator):
    x = _float(images)
    total = x.clone()
    for factor in c:
        total += ops.clipped_zoom(x, float(factor))
    return _to_uint8(total / (len(c) + 1))


# Weather.

def _snow(images, c, generator):
    mean, std, zoom, threshold, blur_radius, blur_sigma, weight = c
    x = _float(images)
    n, _, h, w = x.shape
    flakes = mean + std * torch.randn(n, 1, h, w, generator=generator, dtype=torch.float64, device=x.device)
    flakes = ops.clipped_zoom(flakes, zoom)
    flakes = torch.where(flakes < threshold, 0.0, flakes)
    flakes = (flakes.clamp(0, 1) * 255).to(torch.uint8).float()  # the script saves them as an 8-bit PNG
    angles = _uniform(n, -135, -45, generator)
    flakes = ops.motion_blur(flakes, blur_radius, blur_sigma, angles).round().clamp(0, 255) / 255
    x = weight * x + (1 - weight) * torch.maximum(x, _grey(x) * 1.5 + 0.5)
    return _to_uint8(x + flakes + flakes.flip(-2, -1))


def _frost(images, c, generator, seed):
    image_weight, frost_weight = c
    n, channels, h, w = images.shape
    frost_crops = frost_layer(n, channels, h, w, seed, generator)
    return (image_weight * images.float() + frost_weight * frost_crops).clamp(0, 255).to(torch.uint8)


def _fog(images, c, generator):
    strength, decay = c
    x = _float(images)
    n, _, h, w = x.shape
    mapsize = 1 << (max(h, w) - 1).bit_length()  # 32, 64 and 256 for the scripts' 32, 64 and 224
    fog = ops.plasma_fractal(n, mapsize, decay, generator)[:, None, :h, :w].to(x.dtype)
    max_value = x.amax((1, 2, 3), keepdim=True)
    return _to_uint8((x + strength * fog) * max_value / (max_value + strength))


# Digital.

def _brightness(images, c, generator):
    """scikit-image HSV round trip with V + c clipped to 1: H and S are kept, so every channel is
    scaled by V'/V (a black pixel, S = 0, becomes grey V')."""
    x = _float(images)
    value = x.amax(1, keepdim=True)
    brighter = (value + c).clamp(max=1)
    scaled = x * brighter / value.clamp_min(1e-12)
    return _to_uint8(torch.where(value > 0, scaled, brighter.expand_as(x)))


def _contrast(images, c, generator):
    x = _float(images)
    means = x.mean((2, 3), keepdim=True)
    return _to_uint8((x - means) * c + means)


def _elastic_transform(images, c, generator):
    alpha, sigma, affine_jitter = c
    return _to_uint8(ops.elastic_warp(_float(images), alpha, sigma, affine_jitter, generator))


def _per_image_pillow(images: torch.Tensor, change: Callable[[Image.Image], Image.Image]) -> torch.Tensor:
    """Pillow on each image (CPU), back to a uint8 tensor on the input's device."""
    out = []
    for image in images.cpu():
        array = image.permute(1, 2, 0).numpy()
        pil = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
        result = np.asarray(change(pil)).reshape(array.shape)
        out.append(torch.from_numpy(result.copy()).permute(2, 0, 1))
    return torch.stack(out).to(images.device)


def _pixelate(images, c, generator):
    h, w = images.shape[-2:]

    def box_down_up(pil: Image.Image) -> Image.Image:
        return pil.resize((int(w * c), int(h * c)), Image.BOX).resize((w, h), Image.BOX)

    return _per_image_pillow(images, box_down_up)


def _jpeg_compression(images, c, generator):
    def reencode(pil: Image.Image) -> Image.Image:
        buffer = io.BytesIO()
        pil.save(buffer, "JPEG", quality=c)
        return Image.open(buffer)

    return _per_image_pillow(images, reencode)


# Smallest image side each corruption is defined for, given its severity's constants.

def _min_side(name: str, c) -> int:
    if name == "defocus_blur":
        return max(ops.disk_kernel(*c).shape)  # the kernel must fit in the image
    if name == "glass_blur":
        return 2 * c[1] + 1  # some pixel has a full neighbourhood to swap within
    if name == "elastic_transform":
        return 3  # the affine's three points are min(H, W) // 3 from the centre: collinear below 3
    if name == "pixelate":
        return math.ceil(1 / c)  # int(side * c) >= 1: Pillow cannot resize to 0 pixels
    return 1


_IMPLEMENTATIONS = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise,
    "defocus_blur": _defocus_blur,
    "glass_blur": _glass_blur,
    "motion_blur": _motion_blur,
    "zoom_blur": _zoom_blur,
    "snow": _snow,
    "frost": _frost,
    "fog": _fog,
    "brightness": _brightness,
    "contrast": _contrast,
    "elastic_transform": _elastic_transform,
    "pixelate": _pixelate,
    "jpeg_compression": _jpeg_compression,
}


def _check_images(images: torch.Tensor, name: str) -> None:
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
        got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{name} needs a uint8 torch tensor [N, C, H, W]; got {got}")
    if images.shape[1] not in (1, 3):
        raise ValueError(f"{name} needs 1 (grey) or 3 (RGB) channels in dim 1 of [N, C, H, W]; got {images.shape[1]}")


def _check_severity(severity: int) -> None:
    if isinstance(severity, bool) or severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {list(SEVERITIES)}, got {severity!r}")


def _apply(name: str, images: torch.Tensor, severity: int, seed: int, constants: str) -> torch.Tensor:
    _check_images(images, name)
    _check_severity(severity)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    h, w = images.shape[-2:]
    family = constants_for_size(min(h, w)) if constants == "auto" else constants
    if family not in FAMILIES:
        raise ValueError(f"constants must be 'auto' or one of {list(FAMILIES)}, got {constants!r}")
    c = CONSTANTS[family][name][severity - 1]
    needed = _min_side(name, c)
    if min(h, w) < needed:
        raise ValueError(
            f"{name} at severity {severity} ({family} constants) needs images of at least {needed}x{needed} "
            f"pixels; got {h}x{w}. Use larger images, or other constants (constants=...)."
        )
    if len(images) == 0:
        return images.clone()
    generator = torch.Generator(device=images.device).manual_seed(seed)
    if name == "frost":
        return _frost(images, c, generator, seed)
    return _IMPLEMENTATIONS[name](images, c, generator)


def _public(name: str) -> Callable[..., torch.Tensor]:
    def corruption(images: torch.Tensor, severity: int, seed: int = 0, constants: str = "auto") -> torch.Tensor:
        return _apply(name, images, severity, seed, constants)

    corruption.__name__ = corruption.__qualname__ = name
    corruption.__doc__ = (
        f"{name.replace('_', ' ').capitalize()} of ImageNet-C / CIFAR-10-C: uint8 [N, C, H, W] in, uint8 of "
        "the same shape out; severity 1-5, deterministic for a seed (see the module docstring)."
    )
    return corruption


gaussian_noise = _public("gaussian_noise")
shot_noise = _public("shot_noise")
impulse_noise = _public("impulse_noise")
defocus_blur = _public("defocus_blur")
glass_blur = _public("glass_blur")
motion_blur = _public("motion_blur")
zoom_blur = _public("zoom_blur")
snow = _public("snow")
frost = _public("frost")
fog = _public("fog")
brightness = _public("brightness")
contrast = _public("contrast")
elastic_transform = _public("elastic_transform")
pixelate = _public("pixelate")
jpeg_compression = _public("jpeg_compression")

#: name -> corruption, in the benchmark's order (noise, blur, weather, digital)
CORRUPTIONS: dict[str, Callable[..., torch.Tensor]] = {
    fn.__name__: fn
    for fn in (
        gaussian_noise, shot_noise, impulse_noise, defocus_blur, glass_blur, motion_blur, zoom_blur,
        snow, frost, fog, brightness, contrast, elastic_transform, pixelate, jpeg_compression,
    )
}


def check_corruption_name(name: str) -> None:
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; valid corruptions: {', '.join(CORRUPTIONS)}")


def corrupt(images: torch.Tensor, name: str, severity: int, seed: int = 0, constants: str = "auto") -> torch.Tensor:
    """Corruption ``name`` at ``severity`` (1-5) of a uint8 ``[N, C, H, W]`` batch, deterministic for
    ``seed``; an unknown name or severity, or images too small for the corruption, raise ValueError."""
    check_corruption_name(name)
    return CORRUPTIONS[name](images, severity, seed, constants)
