"""Per-sample random parameters of device-side views, drawn as torchvision v2 draws them, batched.

Each function draws the parameters of `n` images at once (no loop over images) from the same
distribution as the named torchvision v2 transform's `make_params`; tests/test_device_views.py
checks that with two-sample KS tests.
"""

from __future__ import annotations

import math

import torch

CROP_RATIO = (3 / 4, 4 / 3)  # torchvision's RandomResizedCrop default
CROP_TRIES = 10  # torchvision's rejection-sampling budget before the central-crop fallback


def _uniform(n: int, low: float, high: float, device, generator, *shape: int) -> torch.Tensor:
    return torch.empty(n, *shape, device=device).uniform_(low, high, generator=generator)


def sample_crop_boxes(
    n: int, height: int, width: int, scale: tuple[float, float], *, device=None, generator=None
) -> torch.Tensor:
    """RandomResizedCrop boxes as an (n, 4) float tensor of (top, left, box_height, box_width).

    All 10 tries are drawn at once and the first valid one is kept, which is the distribution of
    torchvision's loop (later draws of a sample that already succeeded are simply unused).
    """
    target_area = height * width * _uniform(n, *scale, device, generator, CROP_TRIES)
    log_ratio = _uniform(n, math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]), device, generator, CROP_TRIES)
    aspect = log_ratio.exp()
    w = (target_area * aspect).sqrt().round()  # round half to even, like Python's round()
    h = (target_area / aspect).sqrt().round()
    valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = valid.int().argmax(1, keepdim=True)  # argmax returns the first maximal index
    found = valid.any(1)
    fallback_h, fallback_w = _central_crop_size(height, width)
    h = torch.where(found, h.gather(1, first).squeeze(1), float(fallback_h))
    w = torch.where(found, w.gather(1, first).squeeze(1), float(fallback_w))
    # torch.randint(0, size - box + 1) per sample: floor of a uniform over the admissible range.
    top = (_uniform(n, 0.0, 1.0, device, generator) * (height - h + 1)).floor()
    left = (_uniform(n, 0.0, 1.0, device, generator) * (width - w + 1)).floor()
    top = torch.where(found, top, ((height - h) / 2).floor())
    left = torch.where(found, left, ((width - w) / 2).floor())
    return torch.stack([top, left, h, w], dim=1)


def sample_padded_crop_boxes(
    n: int, height: int, width: int, size: int, padding: int, *, device=None, generator=None
) -> torch.Tensor:
    """RandomCrop(size, padding) boxes as an (n, 4) float tensor of (top, left, size, size), in the
    coordinates of the image padded by `padding` on every side: offsets uniform over the admissible
    range, as torchvision's `torch.randint(0, padded - size + 1)` per axis."""
    padded_h, padded_w = height + 2 * padding, width + 2 * padding
    if size > min(padded_h, padded_w):
        raise ValueError(f"a {size}-px crop does not fit a {height}x{width} image padded by {padding}")
    top = (_uniform(n, 0.0, 1.0, device, generator) * (padded_h - size + 1)).floor()
    left = (_uniform(n, 0.0, 1.0, device, generator) * (padded_w - size + 1)).floor()
    sides = torch.full_like(top, float(size))
    return torch.stack([top, left, sides, sides], dim=1)


def _central_crop_size(height: int, width: int) -> tuple[int, int]:
    in_ratio = width / height
    if in_ratio < min(CROP_RATIO):
        return int(round(width / min(CROP_RATIO))), width
    if in_ratio > max(CROP_RATIO):
        return height, int(round(height * max(CROP_RATIO)))
    return height, width


def sample_jitter(
    n: int, brightness: float, contrast: float, saturation: float, hue: float, *, device=None, generator=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """ColorJitter factors (n, 4) as (brightness, contrast, saturation, hue) and op order (n, 4).

    The order is a uniform random permutation of the four ops per sample (argsort of i.i.d.
    uniforms), as torchvision's `torch.randperm(4)`; a zero strength gives the identity factor.
    """
    factors = torch.stack(
        [
            _uniform(n, max(0.0, 1 - brightness), 1 + brightness, device, generator),
            _uniform(n, max(0.0, 1 - contrast), 1 + contrast, device, generator),
            _uniform(n, max(0.0, 1 - saturation), 1 + saturation, device, generator),
            _uniform(n, -hue, hue, device, generator),
        ],
        dim=1,
    )
    order = _uniform(n, 0.0, 1.0, device, generator, 4).argsort(dim=1)
    return factors, order


def sample_mask(n: int, p: float, *, device=None, generator=None) -> torch.Tensor:
    """Bernoulli(p) per sample: torchvision's RandomApply/Random* apply when rand < p."""
    return _uniform(n, 0.0, 1.0, device, generator) < p


def sample_sigma(n: int, sigma: tuple[float, float], *, device=None, generator=None) -> torch.Tensor:
    """GaussianBlur's sigma ~ U(sigma) per sample (the same sigma along both axes, as torchvision)."""
    return _uniform(n, *sigma, device, generator)
