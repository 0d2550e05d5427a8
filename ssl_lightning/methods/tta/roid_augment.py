"""The augmentation of ROID's consistency loss: the benchmark's ``get_tta_transforms(img_size,
padding_mode="reflect", cotta_augs=False)`` (mariodoebler/test-time-adaptation,
``classification/augmentations/transforms_cotta.py``, after KATANA, Mehrabi et al. 2021).

The benchmark applies these torchvision transforms to the whole batch tensor, so each call draws one
set of random parameters that every image of the batch shares; so does :func:`roid_augment`. The
draws are torchvision's, in its order, from a CPU generator (torch's global one by default), so a
seeded run is reproducible and no value is read from the device. CoTTA uses the same family with
``cotta_augs=True`` (edge padding, plus a Gaussian blur and Gaussian noise).
"""

from __future__ import annotations

import torch
import torchvision.transforms.functional as TF
from torch import Tensor
from torchvision.transforms import InterpolationMode

#: ColorJitterPro's ranges (the benchmark's ``soft=False``): brightness, contrast, saturation, hue, gamma
JITTER_RANGES = ((0.6, 1.4), (0.7, 1.3), (0.5, 1.5), (-0.06, 0.06), (0.7, 1.3))
DEGREES, TRANSLATE, SCALE = (-15.0, 15.0), (1 / 16, 1 / 16), (0.9, 1.1)


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return float(torch.empty(()).uniform_(low, high, generator=generator))  # a CPU tensor: no device sync


def _colour_jitter(images: Tensor, generator: torch.Generator | None) -> Tensor:
    """ColorJitterPro: brightness, contrast, saturation, hue and gamma, each with one factor drawn per
    call, in a random order."""
    adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue, TF.adjust_gamma)
    for index in torch.randperm(5, generator=generator).tolist():
        factor = _uniform(*JITTER_RANGES[index], generator)
        if index == 4:
            images = images.clamp(1e-8, 1.0)  # the benchmark's guard: gamma after contrast can give NaN gradients
        images = adjust[index](images, factor)
    return images


def _affine_parameters(height: int, width: int, generator: torch.Generator | None) -> tuple[float, list[int], float]:
    """``RandomAffine.get_params``'s draws, in its order (angle, x and y translation, scale), from ``generator``."""
    angle = _uniform(*DEGREES, generator)
    max_dx, max_dy = TRANSLATE[0] * width, TRANSLATE[1] * height
    translation = [round(_uniform(-max_dx, max_dx, generator)), round(_uniform(-max_dy, max_dy, generator))]
    return angle, translation, _uniform(*SCALE, generator)


def roid_augment(images: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One random augmentation of a batch of images in pixel space ([0, 1], ``[B, C, H, W]``), shared by
    the batch: clip to [0, 1], colour jitter, reflect-pad by H/2, a random affine map (rotation within
    15 degrees, translation within 1/16 of the padded size, scale 0.9-1.1, no shear, bilinear, zero
    fill), centre crop back to H x W, a horizontal flip with probability 1/2, clip to [0, 1].
    ``generator``: a CPU generator for the random parameters (None: torch's global one)."""
    if images.dim() != 4:
        raise ValueError(f"roid_augment expects images of shape [B, C, H, W], got {tuple(images.shape)}")
    height, width = images.shape[-2:]
    images = _colour_jitter(images.clamp(0.0, 1.0), generator)
    images = TF.pad(images, [height // 2], padding_mode="reflect")
    angle, translation, scale = _affine_parameters(images.shape[-2], images.shape[-1], generator)
    images = TF.affine(images, angle, translation, scale, [0.0, 0.0], interpolation=InterpolationMode.BILINEAR,
                       fill=[0.0] * images.shape[1])
    images = TF.center_crop(images, [height, width])
    if torch.rand(1, generator=generator) < 0.5:
        images = TF.hflip(images)
    return images.clamp(0.0, 1.0)
