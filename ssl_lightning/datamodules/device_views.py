"""Device-side views: a view recipe applied to a uint8 batch after transfer, per-sample parameters.

`DeviceViews(specs, mean, std)(images)` does what `MultiViewTransform` does per image on the CPU,
for a whole BxCxHxW uint8 batch at once: random resized crop (torchvision's rejection sampling) or
padded random crop,
horizontal flip, colour jitter in a random order per sample, grayscale, Gaussian blur, solarize,
then normalisation. Parameters come from `device_params` (torchvision v2's distributions); the
only loops are over views and the four jitter slots, never over images.

Differences from the CPU pipeline (measured in docs/device_views.md):
- crop + resize is bilinear sampling of an affine grid (`grid_sample`), which equals torchvision's
  `resized_crop(antialias=False)`; torchvision's CPU path uses an antialiased resize when it shrinks;
- every op runs in float32 on [0, 1], whereas the CPU path rounds to uint8 after each op.
"""

from __future__ import annotations

from functools import cache, partial

import torch
import torch.nn.functional as F
from torch import nn

from ssl_lightning.datamodules.device_params import (
    sample_crop_boxes,
    sample_jitter,
    sample_mask,
    sample_padded_crop_boxes,
    sample_sigma,
)
from ssl_lightning.datamodules.views import ViewSpec, blur_kernel_size

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale
SOLARIZE_THRESHOLD = 128 / 255  # the CPU recipe's uint8 threshold 128 on the [0, 1] scale


def crop_resize(images: torch.Tensor, boxes: torch.Tensor, size: int, flip: torch.Tensor | None = None) -> torch.Tensor:
    """Bilinear crop of (top, left, h, w) boxes resized to size x size; `flip` mirrors horizontally.

    Output pixel centre u samples source x = left + (u + 0.5) * w / size - 0.5, exactly the
    sampling of `interpolate(align_corners=False)` on the cropped image; clamping the grid to the
    box's outer pixel centres reproduces its edge clamping (crop first, then resize). The flip is
    folded into the grid (a negated x scale), so it costs nothing.
    """
    n, _, height, width = images.shape
    top, left, h, w = boxes.to(images.dtype).unbind(1)
    theta = images.new_zeros(n, 2, 3)
    theta[:, 0, 0] = w / width
    theta[:, 0, 2] = (2 * left + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * top + h) / height - 1
    if flip is not None:
        theta[:, 0, 0] = torch.where(flip, -theta[:, 0, 0], theta[:, 0, 0])
    grid = F.affine_grid(theta, [n, images.shape[1], size, size], align_corners=False)
    low = torch.stack([(2 * left + 1) / width, (2 * top + 1) / height], dim=1) - 1
    high = torch.stack([(2 * (left + w) - 1) / width, (2 * (top + h) - 1) / height], dim=1) - 1
    grid = grid.clamp(low.view(n, 1, 1, 2), high.view(n, 1, 1, 2))
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def to_gray(images: torch.Tensor) -> torch.Tensor:
    if images.shape[1] == 1:
        return images
    weights = images.new_tensor(GRAY_WEIGHTS).view(1, 3, 1, 1)
    return (images * weights).sum(1, keepdim=True)


def _blend(images: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    factor = factor.view(-1, 1, 1, 1)
    return (factor * images + (1 - factor) * other).clamp_(0, 1)


def adjust_brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (images * factor.view(-1, 1, 1, 1)).clamp_(0, 1)


def adjust_contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(images, to_gray(images).mean((1, 2, 3), keepdim=True), factor)


def adjust_saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    if images.shape[1] == 1:  # torchvision: a no-op on one channel
        return images
    return _blend(images, to_gray(images), factor)


def adjust_hue(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's hue shift, exact: to HSV, add `factor` to the hue (mod 1), back to RGB."""
    if images.shape[1] == 1:  # torchvision: a no-op on one channel
        return images
    r, g, b = images.unbind(1)
    value, low = images.amax(1), images.amin(1)
    spread = value - low
    coloured = spread > 0  # grey pixels keep hue 0
    safe_spread = torch.where(coloured, spread, 1.0)
    hue = torch.where(
        value == r, (g - b) / safe_spread, torch.where(value == g, 2 + (b - r) / safe_spread, 4 + (r - g) / safe_spread)
    )
    hue = torch.where(coloured, hue, 0.0)
    hue = (hue / 6 + 1 + factor.view(-1, 1, 1)).remainder(1)
    saturation = spread / torch.where(value > 0, value, 1.0)
    # HSV -> RGB in closed form: channel n (5, 3, 1 for R, G, B) is v - v s clamp(min(k, 4 - k), 0, 1),
    # k = (n + 6 h) mod 6; the same values as the six-sector table torchvision uses.
    offsets = images.new_tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1)
    k = (offsets + 6 * hue.unsqueeze(1)).remainder(6)
    weight = torch.minimum(k, 4 - k).clamp(0, 1)
    return (value.unsqueeze(1) * (1 - saturation.unsqueeze(1) * weight)).clamp_(0, 1)


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def blends_selections(device: torch.device) -> bool:
    """Whether per-sample choices are applied by blending (accelerators) rather than indexing."""
    return device.type != "cpu"


def apply_to(chosen: torch.Tensor, images: torch.Tensor, op, *args: torch.Tensor, blend: bool) -> torch.Tensor:
    """``op(images[i], args[i])`` where ``chosen[i]``, ``images[i]`` elsewhere; ops are per sample.

    Indexing (``blend=False``, the CPU's way) picks the chosen samples, so no work is spent on the
    others. On an accelerator picking by a boolean mask needs the count on the host, a sync that
    stalls the stream every time (dozens per step), and a compiled graph cannot have data-dependent
    shapes; blending runs every sample through ``op`` and ``torch.where`` keeps the chosen results,
    more arithmetic but no wait. Indexing writes into ``images``, so callers pass a tensor of their own.
    """
    if blend:
        return torch.where(chosen.view(-1, 1, 1, 1), op(images, *args), images)
    picked = chosen.nonzero().squeeze(1)
    if len(picked):  # none picked: nothing to run (a grouped convolution over zero channels fails)
        images[picked] = op(images[picked], *(arg[picked] for arg in args))
    return images


def color_jitter(images: torch.Tensor, factors: torch.Tensor, order: torch.Tensor, blend: bool) -> torch.Tensor:
    """Applies op order[i, k] with factors[i, op] in slot k (ops in `JITTER_OPS` order)."""
    if blend:
        return _color_jitter_blended(images, factors, order)
    # Each slot runs each op on the samples that drew it: four ops of work per batch whatever the orders.
    out = images.clone()
    for slot in range(4):
        for op_index, op in enumerate(JITTER_OPS):
            out = apply_to(order[:, slot] == op_index, out, op, factors[:, op_index], blend=False)
    return out


def _color_jitter_blended(images: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """`color_jitter` for every sample at once, with few kernels and the pixels of the ops themselves.

    Brightness, contrast and saturation are one affine step, clamp(a x + b gray(x) + c mean(gray(x)))
    with per-sample (a, b, c) = (f, 0, 0), (f, 0, 1 - f) and (f, 1 - f, 0); (1, 0, 0) leaves x exactly
    as it is (multiplying by one and adding zero are exact in floating point). Each sample's hue sits
    in one slot, so the ops run as: the slots before it (affine steps 0-2, identity from the hue's
    slot on), the hue shift once, then the slots after it (affine steps 1-3, identity up to the
    hue's slot): six affine steps and one hue over the batch instead of four ops in each of the
    four slots, bit for bit the same pixels for images in [0, 1] (which an identity step's clamp keeps).
    """
    brightness, contrast, saturation, hue = range(4)
    drawn = factors.gather(1, order)  # (n, 4): the factor of the op in each slot
    scale = torch.where(order == hue, 1.0, drawn)
    gray_weight = torch.where(order == saturation, 1 - drawn, 0.0)
    mean_weight = torch.where(order == contrast, 1 - drawn, 0.0)
    if images.shape[1] == 1:  # torchvision: saturation and hue are no-ops on one channel
        scale = torch.where(order == saturation, 1.0, scale)
        return _affine_steps(images, scale, None, mean_weight, range(4))
    hue_slot = (order == hue).int().argmax(1, keepdim=True)
    slots = torch.arange(4, device=order.device)
    before, after = slots < hue_slot, slots > hue_slot
    out = _affine_steps(
        images, torch.where(before, scale, 1.0), torch.where(before, gray_weight, 0.0),
        torch.where(before, mean_weight, 0.0), range(3),
    )
    out = adjust_hue(out, factors[:, hue])
    return _affine_steps(
        out, torch.where(after, scale, 1.0), torch.where(after, gray_weight, 0.0),
        torch.where(after, mean_weight, 0.0), range(1, 4),
    )


def _affine_steps(
    images: torch.Tensor, scale: torch.Tensor, gray_weight: torch.Tensor | None, mean_weight: torch.Tensor, slots
) -> torch.Tensor:
    """clamp(scale x + gray_weight gray(x) + mean_weight mean(gray(x))) for each of `slots` in turn,
    with the per-sample (n, 4) weights of each slot (no gray term for one channel)."""
    out = images
    for slot in slots:
        gray = to_gray(out)
        mixed = scale[:, slot].view(-1, 1, 1, 1) * out
        if gray_weight is not None:
            mixed = mixed + gray_weight[:, slot].view(-1, 1, 1, 1) * gray
        mixed = mixed + mean_weight[:, slot].view(-1, 1, 1, 1) * gray.mean((1, 2, 3), keepdim=True)
        out = mixed.clamp_(0, 1)
    return out


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Per-sample Gaussian blur: separable grouped convolutions, reflect padding (as torchvision)."""
    n, c, h, w = images.shape
    half = (kernel_size - 1) / 2
    x = torch.linspace(-half, half, kernel_size, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (x / sigma.view(-1, 1)) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, dim=0)  # (n*c, k)
    pad = kernel_size // 2
    flat = F.pad(images.reshape(1, n * c, h, w), (pad, pad, pad, pad), mode="reflect")
    flat = F.conv2d(flat, kernel.view(n * c, 1, kernel_size, 1), groups=n * c)
    flat = F.conv2d(flat, kernel.view(n * c, 1, 1, kernel_size), groups=n * c)
    return flat.view(n, c, h, w)


def solarize(images: torch.Tensor) -> torch.Tensor:
    return torch.where(images >= SOLARIZE_THRESHOLD, 1 - images, images)


def sample_view_params(
    n: int, height: int, width: int, spec: ViewSpec, device: torch.device, generator: torch.Generator | None = None
) -> dict[str, torch.Tensor]:
    """The per-sample random parameters of one view of `n` images of height x width drawn with `spec`
    (only those of the ops `spec` applies), in a fixed order of draws."""
    kw = {"device": device, "generator": generator}
    if spec.crop_padding:  # boxes in the padded image's coordinates (see draw_views)
        boxes = sample_padded_crop_boxes(n, height, width, spec.crop_size, spec.crop_padding, **kw)
    else:
        boxes = sample_crop_boxes(n, height, width, spec.crop_scale, **kw)
    params = {"boxes": boxes, "flip": sample_mask(n, spec.flip_p, **kw)}
    if spec.jitter_p > 0:
        params["jitter_factors"], params["jitter_order"] = sample_jitter(
            n, spec.brightness, spec.contrast, spec.saturation, spec.hue, **kw
        )
        params["jitter"] = sample_mask(n, spec.jitter_p, **kw)
    if spec.grayscale_p > 0:
        params["grayscale"] = sample_mask(n, spec.grayscale_p, **kw)
    if spec.blur_p > 0:
        params["blur_sigma"] = sample_sigma(n, spec.blur_sigma, **kw)
        params["blur"] = sample_mask(n, spec.blur_p, **kw)
    if spec.solarize_p > 0:
        params["solarize"] = sample_mask(n, spec.solarize_p, **kw)
    return params


def render_view(images: torch.Tensor, params: dict[str, torch.Tensor], spec: ViewSpec, blend: bool) -> torch.Tensor:
    """The view of `images` (float in [0, 1]) that `params` (from `sample_view_params`) describe; un-normalised.

    A pure function of tensors: no random draws and, with ``blend=True``, no data-dependent shapes,
    so ``torch.compile`` can fuse it whole (``DeviceViews(compile=True)``).
    """
    out = crop_resize(images, params["boxes"], spec.crop_size, params["flip"])
    if "jitter" in params:
        jitter = partial(color_jitter, blend=blend)
        out = apply_to(params["jitter"], out, jitter, params["jitter_factors"], params["jitter_order"], blend=blend)
    if "grayscale" in params and out.shape[1] == 3:
        out = torch.where(params["grayscale"].view(-1, 1, 1, 1), to_gray(out).expand_as(out), out)
    if "blur" in params:
        blur = partial(gaussian_blur, kernel_size=blur_kernel_size(spec.crop_size))
        out = apply_to(params["blur"], out, blur, params["blur_sigma"], blend=blend)
    if "solarize" in params:
        out = torch.where(params["solarize"].view(-1, 1, 1, 1), solarize(out), out)
    return out


def draw_views(
    images: torch.Tensor, params: dict[str, torch.Tensor], spec: ViewSpec, mean: torch.Tensor, std: torch.Tensor,
    blend: bool,
) -> torch.Tensor:
    """`spec.num` normalised views of each uint8 image, stacked view after view (what `DeviceViews`
    compiles: from the uint8 batch to the normalised views, one function of tensors)."""
    pixels = images.float().div(255).repeat(spec.num, 1, 1, 1)
    if spec.crop_padding:  # torchvision's RandomCrop pads with zeros, then crops without rescaling
        pixels = F.pad(pixels, (spec.crop_padding,) * 4)
    return (render_view(pixels, params, spec, blend) - mean) / std


class DeviceViews(nn.Module):
    """A resolved view recipe as a batched module: uint8 BxCxHxW in, the recipe's views out
    (a list of float BxCxSxS tensors, normalised, in recipe order like `MultiViewTransform`).

    ``compile=True`` runs the pixel work (everything after the random draws, which stay eager on
    the given generator) through ``torch.compile``, blending every per-sample choice: on an
    accelerator the eager path is hundreds of small kernels per batch, which the compiler fuses
    into a few. The first batch of each shape pays the compilation. On the CPU the eager path,
    which indexes the chosen samples instead of blending, measured faster (docs/device_views.md).
    """

    def __init__(
        self, specs: list[ViewSpec], mean: tuple[float, ...], std: tuple[float, ...], compile: bool = False
    ) -> None:
        super().__init__()
        for spec in specs:
            if spec.crop_size is None or not spec.augments:
                raise ValueError(f"DeviceViews needs resolved, augmenting specs (see resolve_views); got {spec}")
        self.specs = list(specs)
        self.compiled = compile  # not `self.compile`, which would hide nn.Module.compile
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise TypeError(f"DeviceViews expects a uint8 BxCxHxW batch, got {images.dtype} {tuple(images.shape)}")
        n, _, height, width = images.shape
        mean, std = self.mean.to(images.device), self.std.to(images.device)
        draw = compiled_draw_views() if self.compiled else draw_views
        blend = self.compiled or blends_selections(images.device)
        views = []
        for spec in self.specs:
            # All views of one spec in one batched call; they split back in recipe order.
            params = sample_view_params(spec.num * n, height, width, spec, images.device, generator)
            views += list(draw(images, params, spec, mean, std, blend).chunk(spec.num))
        return views


@cache
def compiled_draw_views():
    """`draw_views` through ``torch.compile``, made once per process (a compiled function does not
    pickle, and DataModules travel to ``ddp_spawn`` workers). Shapes are static: a batch of a new
    size (a last, smaller batch without ``drop_last``) compiles once more."""
    return torch.compile(draw_views, dynamic=False)
