"""View recipes: what each augmented view is (ViewSpec), the papers' presets, and their CPU transforms.

A recipe is a list of ViewSpec; each spec stands for `num` views drawn with the same settings, and
the list puts global (largest) crops first. ViewSpec itself knows nothing about torchvision, so the
same recipe can later drive batched device-side augmentation; `MultiViewTransform` is the CPU
implementation (torchvision.transforms.v2, per image, in DataLoader workers).

Preset values (image_size = the DataModule's, in_chans = 1 drops saturation, hue and grayscale,
which need RGB):

- ``simclr`` (SimCLR, Chen et al. 2020, CIFAR settings as in lightly's and solo-learn's CIFAR
  benchmarks): 2 views, crop scale (0.08, 1), flip 0.5, colour jitter of strength s = 0.5, i.e.
  brightness/contrast/saturation/hue 0.4/0.4/0.4/0.1 with p 0.8, grayscale 0.2, Gaussian blur p 0.5
  only when image_size >= 64 (SimCLR drops blur on CIFAR), no solarize.
- ``byol`` (BYOL, Grill et al. 2020, asymmetric): 2 views, crop scale (0.08, 1), flip 0.5, jitter
  0.4/0.4/0.2/0.1 p 0.8, grayscale 0.2; view 1 blur p 1.0 and no solarize, view 2 blur p 0.1 and
  solarize p 0.2. Below 64 px blur is off in both views (solo-learn's CIFAR BYOL recipe) while the
  solarize asymmetry is kept.
- ``dino`` (DINO, Caron et al. 2021): 2 global crops at image_size with scale (0.4, 1) (global 1:
  blur p 1.0; global 2: blur p 0.1, solarize p 0.2) and 6 local crops at round(image_size * 96 / 224)
  with scale (0.05, 0.4) and blur p 0.5; jitter 0.4/0.4/0.2/0.1 p 0.8, grayscale 0.2, flip 0.5.
  Blur is off below 64 px, as for BYOL.
- ``supervised``: 1 view, flip 0.5 and a crop, nothing else: below 64 px, zero padding of 1/8 of
  the image (4 px at 32) and a random crop back to image_size (the standard CIFAR training view of
  the ResNet papers and of the ~95 % CIFAR-10 recipes); from 64 px, random resized crop with scale
  (0.08, 1) (torchvision's ImageNet reference recipe, the base of MAE's and BEiT's fine-tuning
  views, which add RandAugment, not implemented here).
- ``none``: 1 view, no augmentation (resize to image_size); also the validation and kNN-bank view.

Blur uses sigma in (0.1, 2.0) and a kernel of about 10 % of the crop size, made odd (at least 3).
Solarize inverts pixels >= 128 (0.5 of the uint8 range).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torchvision.transforms import v2

# Blur helps on ImageNet-sized crops but hurts on 32-px images (SimCLR appendix B.9, solo-learn CIFAR).
MIN_SIZE_FOR_BLUR = 64
# Supervised training crops: padded random crops below this size (CIFAR), random resized crops from it.
MIN_SIZE_FOR_RESIZED_CROP = 64


@dataclass(frozen=True)
class ViewSpec:
    """How to draw `num` augmented views. `crop_size=None` means the DataModule's image_size.

    `crop_scale=None` means "no augmentation": the image is resized (shorter side) and centre-cropped
    to crop_size, and every other field is ignored. Otherwise the order is torchvision's usual one:
    random resized crop, flip, colour jitter, grayscale, blur, solarize. `crop_padding > 0` replaces
    the random resized crop by torchvision's `RandomCrop(crop_size, padding=crop_padding)` on the
    image resized to crop_size: zero padding on every side, then a crop of crop_size at a uniform
    offset, no rescaling (CIFAR's training crop); crop_scale is then unused. On 1-channel images
    torchvision treats saturation, hue and grayscale as no-ops; the presets set them to 0 there.
    """

    num: int = 1
    crop_size: int | None = None
    crop_scale: tuple[float, float] | None = (0.08, 1.0)
    crop_padding: int = 0
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0

    def __post_init__(self) -> None:
        if self.num < 1:
            raise ValueError(f"ViewSpec.num must be at least 1, got {self.num}")
        if self.crop_size is not None and self.crop_size < 1:
            raise ValueError(f"ViewSpec.crop_size must be positive or None, got {self.crop_size}")
        if self.crop_scale is not None and not 0.0 < self.crop_scale[0] <= self.crop_scale[1] <= 1.0:
            raise ValueError(f"ViewSpec.crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        if self.crop_padding < 0:
            raise ValueError(f"ViewSpec.crop_padding must be >= 0 (0: random resized crop), got {self.crop_padding}")
        if self.crop_padding and self.crop_scale is None:
            raise ValueError("ViewSpec: crop_padding needs an augmenting view; crop_scale=None means no augmentation")
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"ViewSpec.{name} is a probability in [0, 1], got {getattr(self, name)}")

    @property
    def augments(self) -> bool:
        return self.crop_scale is not None


def _colour(in_chans: int, saturation: float) -> dict:
    """Jitter and grayscale settings; saturation, hue and grayscale only exist for RGB images."""
    if in_chans == 1:
        return {"brightness": 0.4, "contrast": 0.4, "saturation": 0.0, "hue": 0.0, "grayscale_p": 0.0}
    return {"brightness": 0.4, "contrast": 0.4, "saturation": saturation, "hue": 0.1, "grayscale_p": 0.2}


def _blur(p: float, image_size: int) -> float:
    return p if image_size >= MIN_SIZE_FOR_BLUR else 0.0


def simclr_views(image_size: int, in_chans: int) -> list[ViewSpec]:
    return [ViewSpec(num=2, blur_p=_blur(0.5, image_size), **_colour(in_chans, saturation=0.4))]


def byol_views(image_size: int, in_chans: int) -> list[ViewSpec]:
    colour = _colour(in_chans, saturation=0.2)
    return [
        ViewSpec(blur_p=_blur(1.0, image_size), solarize_p=0.0, **colour),
        ViewSpec(blur_p=_blur(0.1, image_size), solarize_p=0.2, **colour),
    ]


def dino_views(image_size: int, in_chans: int, num_local: int = 6) -> list[ViewSpec]:
    colour = _colour(in_chans, saturation=0.2)
    global_scale, local_scale = (0.4, 1.0), (0.05, 0.4)
    local_size = round(image_size * 96 / 224)
    return [
        ViewSpec(crop_scale=global_scale, blur_p=_blur(1.0, image_size), **colour),
        ViewSpec(crop_scale=global_scale, blur_p=_blur(0.1, image_size), solarize_p=0.2, **colour),
        ViewSpec(num=num_local, crop_size=local_size, crop_scale=local_scale, blur_p=_blur(0.5, image_size), **colour),
    ]


def supervised_views(image_size: int, in_chans: int) -> list[ViewSpec]:
    padding = image_size // 8 if image_size < MIN_SIZE_FOR_RESIZED_CROP else 0
    no_colour = {"jitter_p": 0.0, "brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "hue": 0.0, "grayscale_p": 0.0}
    return [ViewSpec(crop_padding=padding, **no_colour)]


def plain_views(image_size: int, in_chans: int) -> list[ViewSpec]:
    return [ViewSpec(crop_scale=None)]


VIEW_PRESETS: dict[str, Callable[[int, int], list[ViewSpec]]] = {
    "simclr": simclr_views,
    "byol": byol_views,
    "dino": dino_views,
    "supervised": supervised_views,
    "none": plain_views,
}


def check_preset_name(name: str) -> None:
    if name not in VIEW_PRESETS:
        raise ValueError(f"unknown view preset {name!r}; valid presets: {', '.join(VIEW_PRESETS)}")


def resolve_views(views: str | list[ViewSpec], image_size: int, in_chans: int) -> list[ViewSpec]:
    """A preset name or a list of specs -> specs with every crop_size filled in, global crops first."""
    if isinstance(views, str):
        check_preset_name(views)
        views = VIEW_PRESETS[views](image_size, in_chans)
    if not views:
        raise ValueError("views is an empty list: give a preset name or at least one ViewSpec")
    specs = [replace(spec, crop_size=spec.crop_size or image_size) for spec in views]
    sizes = [spec.crop_size for spec in specs]
    if sizes != sorted(sizes, reverse=True):
        raise ValueError(f"views must list global (largest) crops first; crop sizes in order: {sizes}")
    return specs


def views_are_deterministic(specs: list[ViewSpec], on_device: bool = False, batch_styles: bool = False) -> bool:
    """Whether training views are a fixed function of the image: the same tensor for an image at every
    epoch and in every batch. That needs every spec un-augmented (``crop_scale=None``: resize and centre
    crop, e.g. the ``none`` preset), the views drawn per image on the CPU (``on_device``: device-side
    views exist to augment) and no Batch Styles Standardization (``batch_styles``: it mixes amplitudes
    of images drawn at random from the batch)."""
    return not on_device and not batch_styles and not any(spec.augments for spec in specs)


def blur_kernel_size(crop_size: int) -> int:
    """About 10 % of the crop (SimCLR), odd as convolution needs, at least 3."""
    size = max(3, round(0.1 * crop_size))
    return size if size % 2 else size + 1


def build_view_transform(
    spec: ViewSpec, mean: tuple[float, ...], std: tuple[float, ...]
) -> v2.Compose:
    """One view's CPU pipeline: uint8 CxHxW tensor in, normalised float32 CxSxS tensor out."""
    size = spec.crop_size
    if size is None:
        raise ValueError("build_view_transform needs a resolved spec (crop_size set); use resolve_views")
    plain = [v2.Resize(size, antialias=True), v2.CenterCrop(size)]
    if not spec.augments:
        steps: list = plain
    else:
        if spec.crop_padding:
            steps = [*plain, v2.RandomCrop(size, padding=spec.crop_padding)]
        else:
            steps = [v2.RandomResizedCrop(size, scale=spec.crop_scale, antialias=True)]
        if spec.flip_p > 0:
            steps.append(v2.RandomHorizontalFlip(spec.flip_p))
        if spec.jitter_p > 0:
            jitter = v2.ColorJitter(spec.brightness, spec.contrast, spec.saturation, spec.hue)
            steps.append(v2.RandomApply([jitter], p=spec.jitter_p))
        if spec.grayscale_p > 0:
            steps.append(v2.RandomGrayscale(spec.grayscale_p))
        if spec.blur_p > 0:
            blur = v2.GaussianBlur(blur_kernel_size(size), sigma=spec.blur_sigma)
            steps.append(v2.RandomApply([blur], p=spec.blur_p))
        if spec.solarize_p > 0:
            steps.append(v2.RandomSolarize(threshold=128, p=spec.solarize_p))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(steps)


class MultiViewTransform:
    """Applies every view of a resolved recipe to one image; returns the views in recipe order."""

    def __init__(self, specs: list[ViewSpec], mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.transforms = [build_view_transform(spec, mean, std) for spec in specs for _ in range(spec.num)]

    def __call__(self, image: torch.Tensor) -> list[torch.Tensor]:
        return [transform(image) for transform in self.transforms]
