"""The test-time augmentations of CoTTA, RMT and ROID: the benchmark's ``get_tta_transforms``
(mariodoebler/test-time-adaptation, ``classification/augmentations/transforms_cotta.py``, after KATANA,
Mounsaveng et al. 2021), with torchvision's tensor functionals on the images' device.

The transform: clip to [0, 1]; ColorJitterPro (brightness [0.6, 1.4], contrast [0.7, 1.3], saturation
[0.5, 1.5], hue [-0.06, 0.06], gamma [0.7, 1.3], in a random order); padding by half the image size;
a random affine map (rotation within 15 degrees, translation within 1/16 of the padded size, scale
[0.9, 1.1], bilinear, fill 0); with ``cotta_augs`` a 5 x 5 Gaussian blur with sigma in [0.001, 0.5];
the centre crop back to the image size; a horizontal flip with probability 1/2; with ``cotta_augs``
Gaussian noise of std 0.005; clip to [0, 1]. CoTTA and RMT use the benchmark's defaults (edge
padding, ``cotta_augs=True``), ROID ``padding_mode="reflect", cotta_augs=False``.

The benchmark applies the transform to the whole batch tensor, so one draw of the random parameters
serves every image of the batch (only the noise is per pixel); so does :func:`tta_augment`. The
parameters are drawn in torchvision's order from a CPU generator (Python numbers: nothing is read
from the device); the noise comes from the device's global generator.
"""

from __future__ import annotations

import torch
import torchvision.transforms.functional as TF
from torch import Tensor, nn
from torchvision.transforms import InterpolationMode

#: ColorJitterPro's ranges (the benchmark's ``soft=False``): brightness, contrast, saturation, hue, gamma
JITTER_RANGES = ((0.6, 1.4), (0.7, 1.3), (0.5, 1.5), (-0.06, 0.06), (0.7, 1.3))
DEGREES, TRANSLATE, SCALE = (-15.0, 15.0), 1 / 16, (0.9, 1.1)
BLUR_KERNEL, BLUR_SIGMA = 5, (0.001, 0.5)
FLIP_PROBABILITY, NOISE_STD = 0.5, 0.005
PADDING_MODES = ("edge", "reflect", "constant", "symmetric")


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


def tta_augment(images: Tensor, generator: torch.Generator | None = None, padding_mode: str = "edge",
                cotta_augs: bool = True, noise_std: float = NOISE_STD) -> Tensor:
    """One random augmentation of a batch of pixel images (``[B, C, H, W]`` in [0, 1], C = 1 or 3),
    one parameter draw for the whole batch. ``generator``: the CPU generator of the draws (None:
    torch's global one)."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"tta_augment expects images [B, C, H, W] with C = 1 or 3, got {tuple(images.shape)}")
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"tta_augment: padding_mode must be one of {', '.join(PADDING_MODES)}, got {padding_mode!r}")
    height, width = images.shape[-2:]
    images = _colour_jitter(images.clamp(0.0, 1.0), generator)
    images = TF.pad(images, [height // 2], padding_mode=padding_mode)
    # RandomAffine.get_params' draws, in its order: angle, x and y translation (whole pixels), scale
    angle = _uniform(*DEGREES, generator)
    max_dx, max_dy = TRANSLATE * images.shape[-1], TRANSLATE * images.shape[-2]
    translation = [round(_uniform(-max_dx, max_dx, generator)), round(_uniform(-max_dy, max_dy, generator))]
    scale = _uniform(*SCALE, generator)
    images = TF.affine(images, angle, translation, scale, [0.0, 0.0], interpolation=InterpolationMode.BILINEAR,
                       fill=[0.0] * images.shape[1])
    if cotta_augs:
        sigma = _uniform(*BLUR_SIGMA, generator)
        images = TF.gaussian_blur(images, [BLUR_KERNEL, BLUR_KERNEL], [sigma, sigma])
    images = TF.center_crop(images, [height, width])
    if torch.rand(1, generator=generator) < FLIP_PROBABILITY:
        images = TF.hflip(images)
    if cotta_augs and noise_std > 0:
        images = images + torch.randn_like(images) * noise_std
    return images.clamp(0.0, 1.0)


class PixelAugment(nn.Module):
    """:func:`tta_augment` on normalised images: the benchmark's models normalise inside, so its
    transforms see pixels in [0, 1]; our batches are normalised with the data's ``mean`` and ``std``,
    so this undoes that, augments and normalises again.

    The draws come from this module's own CPU generator, seeded with ``seed``: built with the run's
    seed, the same on every process (see :func:`pixel_augment`), every process draws the same
    augmentation whatever else used the global generator, so several processes adapt as one does.
    A method's ``reset()`` leaves it running, as the benchmark's global generator is (an episodic run
    would otherwise repeat one augmentation on every batch). ``mean`` and ``std`` are non-persistent
    buffers: they follow the device and stay out of the state dict."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], seed: int = 0, padding_mode: str = "edge",
                 cotta_augs: bool = True, noise_std: float = NOISE_STD):
        super().__init__()
        if len(mean) != len(std) or len(mean) not in (1, 3) or min(std) <= 0:
            raise ValueError(f"PixelAugment needs the mean and std of 1 or 3 channels (std > 0), got {mean} and {std}")
        if noise_std < 0:
            raise ValueError(f"PixelAugment needs noise_std >= 0, got {noise_std}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.generator = torch.Generator().manual_seed(seed)
        self.padding_mode, self.cotta_augs, self.noise_std = padding_mode, cotta_augs, noise_std

    def forward(self, images: Tensor) -> Tensor:
        pixels = images * self.std + self.mean
        augmented = tta_augment(pixels, self.generator, self.padding_mode, self.cotta_augs, self.noise_std)
        return (augmented - self.mean) / self.std


def pixel_augment(method: nn.Module, padding_mode: str = "edge", cotta_augs: bool = True,
                  otherwise: str = "") -> PixelAugment:
    """The augmentation for a TTA ``method``'s test data: the data's mean and std (its batches are
    normalised; data without them is refused), and the run's seed (``torch.initial_seed()``, rank 0's
    under several processes, where rank 0 alone prepared the data and so drew from the global generator).
    ``otherwise``: how to do without the augmentation, added to the refusal."""
    trainer = method._trainer
    datamodule = trainer.datamodule if trainer is not None else None
    mean, std = getattr(datamodule, "mean", None), getattr(datamodule, "std", None)
    if mean is None or std is None:
        raise ValueError(
            f"{type(method).__name__} augments test images in pixel space, so it needs the data's mean and std, "
            f"which {type(datamodule).__name__} does not give: test with one of our DataModules (a CorruptionStream)"
            f"{otherwise}."
        )
    seed = torch.initial_seed()
    if trainer is not None:
        seed = trainer.strategy.broadcast(seed)
    return PixelAugment(tuple(mean), tuple(std), seed, padding_mode, cotta_augs)
