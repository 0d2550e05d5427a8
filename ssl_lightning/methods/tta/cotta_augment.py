"""CoTTA's test-time augmentations (also RMT's augmented view), batched in torch on the images' device.

The mariodoebler/test-time-adaptation benchmark's ``classification/augmentations/transforms_cotta.py``
(``get_tta_transforms``, from KATANA, Mounsaveng et al. 2021; qinenergy/cotta): clip to [0, 1]; colour
jitter with brightness [0.6, 1.4], contrast [0.7, 1.3], saturation [0.5, 1.5], hue [-0.06, 0.06] and
gamma [0.7, 1.3] in a random order; edge padding by half the image size; a random affine map (rotation
+-15 degrees, translation up to 1/16 of the padded size in whole pixels, scale [0.9, 1.1], bilinear,
fill 0); a 5 x 5 Gaussian blur with sigma in [0.001, 0.5]; the centre crop back to the image size; a
horizontal flip with probability 0.5; Gaussian noise of std 0.005; clip to [0, 1].

The benchmark applies the torchvision transform to the whole batch tensor, so one draw of the random
parameters serves every image of the batch (only the noise is per pixel); so does :func:`cotta_augment`.
Each operation here computes what torchvision's tensor functional of the same name computes
(``tests/methods/test_tta_cotta_rmt.py`` checks them against it). The parameters are drawn from
torch's global CPU generator in the benchmark's order (no device sync: they are Python numbers), the
noise from the device's global generator, so a seeded run is reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: the benchmark's ranges (``soft=False``)
BRIGHTNESS, CONTRAST, SATURATION, HUE, GAMMA = (0.6, 1.4), (0.7, 1.3), (0.5, 1.5), (-0.06, 0.06), (0.7, 1.3)
DEGREES, TRANSLATE, SCALE = (-15.0, 15.0), 1 / 16, (0.9, 1.1)
BLUR_KERNEL, BLUR_SIGMA = 5, (0.001, 0.5)
FLIP_PROBABILITY, NOISE_STD = 0.5, 0.005
COLOUR_OPERATIONS = ("brightness", "contrast", "saturation", "hue", "gamma")


@dataclass(frozen=True)
class AugmentParameters:
    """One draw of the random parameters: the colour operations in their order, with factors, then
    the affine map (degrees, whole-pixel translation, scale), the blur's sigma and the flip."""

    colour: tuple[tuple[str, float], ...]
    angle: float
    translate: tuple[int, int]
    scale: float
    sigma: float
    flip: bool


def _uniform(low: float, high: float) -> float:
    return float(torch.empty(1).uniform_(low, high).item())  # a CPU tensor: no device sync


def draw_parameters(image_size: int) -> AugmentParameters:
    """Draw from torch's global CPU generator, in the order the benchmark's transforms draw: the colour
    order (``randperm(5)``) and factors, the affine angle, x and y shifts, scale, the blur sigma, the flip."""
    ranges = dict(zip(COLOUR_OPERATIONS, (BRIGHTNESS, CONTRAST, SATURATION, HUE, GAMMA)))
    order = torch.randperm(len(COLOUR_OPERATIONS)).tolist()
    colour = tuple((COLOUR_OPERATIONS[i], _uniform(*ranges[COLOUR_OPERATIONS[i]])) for i in order)
    angle = _uniform(*DEGREES)
    padded = image_size + 2 * (image_size // 2)
    shift = TRANSLATE * padded
    translate = (round(_uniform(-shift, shift)), round(_uniform(-shift, shift)))  # whole pixels, as torchvision
    scale = _uniform(*SCALE)
    sigma = _uniform(*BLUR_SIGMA)
    flip = bool(torch.rand(1) < FLIP_PROBABILITY)
    return AugmentParameters(colour, angle, translate, scale, sigma, flip)


# ---------------------------------------------------------------------------- colour (pixels in [0, 1])
def _grayscale(images: Tensor) -> Tensor:
    if images.shape[1] == 1:
        return images
    r, g, b = images.unbind(dim=1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def _blend(images: Tensor, other: Tensor, factor: float) -> Tensor:
    return (factor * images + (1.0 - factor) * other).clamp(0.0, 1.0)


def _rgb_to_hsv(images: Tensor) -> Tensor:
    r, g, b = images.unbind(dim=1)
    high, low = images.amax(dim=1), images.amin(dim=1)
    grey = high == low  # hue and saturation 0; the divisors below become 1 there
    spread = high - low
    saturation = spread / torch.where(grey, torch.ones_like(high), high)
    divisor = torch.where(grey, torch.ones_like(spread), spread)
    rc, gc, bc = (high - r) / divisor, (high - g) / divisor, (high - b) / divisor
    hue = ((high == r) * (bc - gc) + ((high == g) & (high != r)) * (2.0 + rc - bc)
           + ((high != g) & (high != r)) * (4.0 + gc - rc))
    return torch.stack((torch.fmod(hue / 6.0 + 1.0, 1.0), saturation, high), dim=1)


def _hsv_to_rgb(hsv: Tensor) -> Tensor:
    h, s, v = hsv.unbind(dim=1)
    sector = torch.floor(h * 6.0)
    fraction = h * 6.0 - sector
    sector = sector.to(torch.int64) % 6
    p = (v * (1.0 - s)).clamp(0.0, 1.0)
    q = (v * (1.0 - s * fraction)).clamp(0.0, 1.0)
    t = (v * (1.0 - s * (1.0 - fraction))).clamp(0.0, 1.0)
    # per sector k, (r, g, b) is the k-th entry of each row (the HSV hexcone)
    table = torch.stack([torch.stack(row, dim=1) for row in ((v, q, p, p, t, v), (t, v, v, q, p, p),
                                                              (p, p, t, v, v, q))], dim=1)  # [B, 3, 6, H, W]
    return table.gather(2, sector[:, None, None].expand(-1, 3, 1, -1, -1)).squeeze(2)


def _adjust(images: Tensor, operation: str, factor: float) -> Tensor:
    if operation == "brightness":
        return _blend(images, torch.zeros_like(images), factor)
    if operation == "contrast":
        return _blend(images, _grayscale(images).mean(dim=(1, 2, 3), keepdim=True), factor)
    if operation == "saturation":
        return images if images.shape[1] == 1 else _blend(images, _grayscale(images), factor)
    if operation == "hue":
        if images.shape[1] == 1:
            return images
        hsv = _rgb_to_hsv(images)
        return _hsv_to_rgb(torch.cat([(hsv[:, :1] + factor) % 1.0, hsv[:, 1:]], dim=1))
    # gamma: the benchmark clamps first (a zero pixel's gradient of x ** gamma is nan after contrast)
    return images.clamp(1e-8, 1.0).pow(factor).clamp(0.0, 1.0)


# ---------------------------------------------------------------------------- geometry
def _affine(images: Tensor, angle: float, translate: tuple[int, int], scale: float) -> Tensor:
    """torchvision's tensor ``affine`` about the image centre, bilinear, fill 0: the inverse map in
    pixel units samples a grid of pixel centres (``grid_sample``, ``align_corners=False``), and the
    sampled image is multiplied by a sampled mask of ones, as torchvision's fill does. The map's
    coefficients stay Python numbers (kernel arguments), so nothing is copied to the device."""
    batch, _, height, width = images.shape
    rotation = math.radians(angle)
    cos, sin = math.cos(rotation) / scale, math.sin(rotation) / scale
    tx, ty = translate
    xs = torch.linspace(-width * 0.5 + 0.5, width * 0.5 - 0.5, width, dtype=images.dtype, device=images.device)
    ys = torch.linspace(-height * 0.5 + 0.5, height * 0.5 - 0.5, height, dtype=images.dtype, device=images.device)
    x, y = xs.expand(height, width), ys[:, None].expand(height, width)
    source_x = (cos * x + sin * y - cos * tx - sin * ty) / (0.5 * width)
    source_y = (-sin * x + cos * y + sin * tx - cos * ty) / (0.5 * height)
    grid = torch.stack([source_x, source_y], dim=-1).expand(batch, height, width, 2)
    sampled = F.grid_sample(torch.cat([images, torch.ones_like(images[:, :1])], dim=1), grid, mode="bilinear",
                            padding_mode="zeros", align_corners=False)
    return sampled[:, :-1] * sampled[:, -1:]


def _gaussian_blur(images: Tensor, sigma: float) -> Tensor:
    half = (BLUR_KERNEL - 1) * 0.5
    x = torch.linspace(-half, half, BLUR_KERNEL, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-0.5 * (x / sigma).pow(2))
    kernel = kernel / kernel.sum()
    channels = images.shape[1]
    kernel = (kernel[:, None] * kernel[None, :]).expand(channels, 1, BLUR_KERNEL, BLUR_KERNEL)
    pad = BLUR_KERNEL // 2
    return F.conv2d(F.pad(images, (pad, pad, pad, pad), mode="reflect"), kernel, groups=channels)


def apply_parameters(pixels: Tensor, parameters: AugmentParameters, noise_std: float = NOISE_STD) -> Tensor:
    """The benchmark's transform on ``pixels`` ([B, C, H, W] in [0, 1] or beyond, C = 1 or 3) with the
    drawn ``parameters``; the noise from the device's global generator."""
    images = pixels.clamp(0.0, 1.0)
    for operation, factor in parameters.colour:
        images = _adjust(images, operation, factor)
    size = images.shape[-1]
    pad = size // 2
    images = F.pad(images, (pad, pad, pad, pad), mode="replicate")
    images = _affine(images, parameters.angle, parameters.translate, parameters.scale)
    images = _gaussian_blur(images, parameters.sigma)
    top, left = round((images.shape[-2] - pixels.shape[-2]) / 2.0), round((images.shape[-1] - size) / 2.0)
    images = images[..., top:top + pixels.shape[-2], left:left + size]
    if parameters.flip:
        images = images.flip(-1)
    if noise_std > 0:
        images = images + torch.randn_like(images) * noise_std
    return images.clamp(0.0, 1.0)


def cotta_augment(pixels: Tensor, noise_std: float = NOISE_STD) -> Tensor:
    """One random CoTTA augmentation of a batch of pixel images (one parameter draw for the batch)."""
    if pixels.dim() != 4 or pixels.shape[1] not in (1, 3):
        raise ValueError(f"cotta_augment expects images [B, C, H, W] with C = 1 or 3, got {tuple(pixels.shape)}")
    return apply_parameters(pixels, draw_parameters(pixels.shape[-1]), noise_std)


class CoTTAAugment(nn.Module):
    """:func:`cotta_augment` on normalised images: the benchmark's models normalise inside, so its
    transforms see pixels in [0, 1]; our batches are normalised with the data's ``mean`` and ``std``
    (``CorruptionStream``), so this undoes that, augments and normalises again. ``mean`` and ``std``
    are non-persistent buffers: they follow the device and stay out of the state dict."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], noise_std: float = NOISE_STD):
        super().__init__()
        if len(mean) != len(std) or len(mean) not in (1, 3) or min(std) <= 0:
            raise ValueError(f"CoTTAAugment needs the mean and std of 1 or 3 channels (std > 0), got {mean} and {std}")
        if noise_std < 0:
            raise ValueError(f"CoTTAAugment needs noise_std >= 0, got {noise_std}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.noise_std = noise_std

    def forward(self, images: Tensor) -> Tensor:
        pixels = images * self.std + self.mean
        return (cotta_augment(pixels, self.noise_std) - self.mean) / self.std
