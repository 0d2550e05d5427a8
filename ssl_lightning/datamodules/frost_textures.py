"""Procedural frost textures: what the frost corruption lays over images instead of photographs.

make_cifar_c.py (Hendrycks & Dietterich, ICLR 2019) blends each image with a random crop of one of
five photographs of frost on a window (``frost1.png`` ... ``frost5.jpg``, shrunk to 0.2x for CIFAR,
0.3x for Tiny-ImageNet, kept whole for ImageNet). Those files are not downloaded here. Instead each
texture is drawn, deterministically from a seed, as what those photographs show: straight ice
needles at random angles with side branches at +-60 degrees (the hexagonal habit of ice), denser in
cloudy patches over a faint haze, in a cold blue-white tint. The textures are therefore not the
published ones: frost corruptions made here are regenerated, not CIFAR-10-C's (docs/corruptions.md).

The texture side is ``TEXTURE_SIDE_PER_IMAGE_SIDE`` times the image side, so a crop covers a sixth
of a texture's side at every image size (a choice made here, of the order of a 32-px crop of a
0.2x photograph). Textures wider than ``MAX_DRAWN_SIDE`` are drawn at that side and read
bilinearly, i.e. upsampled (224-px images: 1344-px textures drawn at 384 px).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F

from ssl_lightning.datamodules.corruption_ops import gaussian_filter

NUM_TEXTURES = 5  # make_cifar_c.py draws from its first five photographs
TEXTURE_SIDE_PER_IMAGE_SIDE = 6
MAX_DRAWN_SIDE = 384
TINT = (0.84, 0.92, 1.0)  # RGB gains of the bright ice: cold blue-white
NEEDLE_LENGTH = (0.02, 0.09)  # of the texture side
BRANCHES_PER_NEEDLE = 6
BRANCH_ANGLE = math.pi / 3
BRANCH_LENGTH = 0.35  # of the needle's length, tapering towards its tip
LINE_INK_PER_PIXEL = 0.3  # needle and branch length drawn per texture pixel
STEP = 0.5  # pixels between the points that rasterise a line


def _haze(side: int, generator: torch.Generator) -> torch.Tensor:
    """Fractal value noise in [0, 1]: five octaves of bicubically upsampled uniform grids."""
    total = torch.zeros(1, 1, side, side, dtype=torch.float64)
    for octave in range(5):
        cells = 4 * 2**octave
        grid = torch.rand(1, 1, cells + 1, cells + 1, generator=generator, dtype=torch.float64)
        total += 0.5**octave * F.interpolate(grid, size=(side, side), mode="bicubic", align_corners=True)
    total -= total.min()
    return (total / total.max())[0, 0]


def _segments(side: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Needles and their side branches as (start [S, 2], direction [S, 2], length [S], ink [S])."""
    low, high = NEEDLE_LENGTH
    mean_ink = side * (low + high) / 2 * (1 + BRANCHES_PER_NEEDLE * BRANCH_LENGTH / 2)
    count = max(1, round(LINE_INK_PER_PIXEL * side * side / mean_ink))
    start = torch.rand(count, 2, generator=generator, dtype=torch.float64) * side
    angle = torch.rand(count, generator=generator, dtype=torch.float64) * math.pi * 2
    length = side * (low + (high - low) * torch.rand(count, generator=generator, dtype=torch.float64))
    ink = 0.35 + 0.65 * torch.rand(count, generator=generator, dtype=torch.float64)
    direction = torch.stack([torch.cos(angle), torch.sin(angle)], 1)
    # Branches leave the needle at evenly spaced points, alternately to each side, shorter near the tip.
    where = (torch.arange(BRANCHES_PER_NEEDLE, dtype=torch.float64) + 0.5) / BRANCHES_PER_NEEDLE
    side_sign = torch.tensor([1.0, -1.0], dtype=torch.float64).repeat(BRANCHES_PER_NEEDLE)[:BRANCHES_PER_NEEDLE]
    branch_angle = angle[:, None] + side_sign * BRANCH_ANGLE
    branch_start = start[:, None] + where[None, :, None] * length[:, None, None] * direction[:, None]
    branch_length = BRANCH_LENGTH * length[:, None] * (1 - where)
    branch_direction = torch.stack([torch.cos(branch_angle), torch.sin(branch_angle)], -1)
    return (
        torch.cat([start, branch_start.reshape(-1, 2)]),
        torch.cat([direction, branch_direction.reshape(-1, 2)]),
        torch.cat([length, branch_length.reshape(-1)]),
        torch.cat([ink, (0.8 * ink[:, None]).expand(-1, BRANCHES_PER_NEEDLE).reshape(-1)]),
    )


def _crystals(side: int, generator: torch.Generator) -> torch.Tensor:
    """Rasterised needles (points every STEP px, wrapped at the edges so the texture tiles)."""
    start, direction, length, ink = _segments(side, generator)
    along = torch.arange(0, float(length.max()) + STEP, STEP, dtype=torch.float64)
    points = start[:, None] + along[None, :, None] * direction[:, None]  # [S, T, 2]
    drawn = (along[None, :] <= length[:, None]).flatten()
    cells = torch.remainder(points.round().long(), side).view(-1, 2)[drawn]
    canvas = torch.zeros(side * side, dtype=torch.float64)
    canvas.index_add_(0, cells[:, 1] * side + cells[:, 0], ink[:, None].expand(-1, len(along)).flatten()[drawn] * STEP)
    crystals = gaussian_filter(canvas.view(1, 1, side, side), 0.6, mode="nearest")[0, 0]
    return crystals.clamp(max=1.0)


def _texture(side: int, generator: torch.Generator) -> torch.Tensor:
    """One frost texture, float64 [side, side] in [0, 1]."""
    haze, crystals = _haze(side, generator), _crystals(side, generator)
    return (0.2 + 0.3 * haze + crystals * (0.45 + 0.9 * haze)).clamp(0, 1)


@lru_cache(maxsize=4)
def frost_textures(image_side: int, channels: int, seed: int) -> torch.Tensor:
    """``NUM_TEXTURES`` textures, float32 ``[NUM_TEXTURES, channels, D, D]`` holding whole 0-255
    values (an 8-bit picture), D = min(6 x image_side, MAX_DRAWN_SIDE); the same for the same
    arguments (cached: treat the tensor as read-only)."""
    side = min(TEXTURE_SIDE_PER_IMAGE_SIDE * image_side, MAX_DRAWN_SIDE)
    generator = torch.Generator().manual_seed(seed)
    values = torch.stack([_texture(side, generator) for _ in range(NUM_TEXTURES)])[:, None]
    tint = torch.tensor(TINT, dtype=torch.float64).view(1, 3, 1, 1)
    if channels == 1:  # the luminance of the tint (ITU-R 601 weights, as the RGB-to-grey of OpenCV)
        tint = (tint * torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64).view(1, 3, 1, 1)).sum(1, keepdim=True)
    return (values * tint * 255).round().float()


def frost_layer(
    count: int, channels: int, height: int, width: int, seed: int, generator: torch.Generator
) -> torch.Tensor:
    """Random crops of the seed's textures, float32 ``[count, channels, height, width]`` in 0-255.

    As make_cifar_c.py: per image one of the textures (uniform) and a crop at a uniform integer
    offset of the full-size texture (side 6 x max(height, width)). A texture drawn smaller than
    that (above ``MAX_DRAWN_SIDE``) is read bilinearly at the crop's pixel centres.
    """
    device = generator.device
    textures = frost_textures(max(height, width), channels, seed).to(device)
    full_side, drawn_side = TEXTURE_SIDE_PER_IMAGE_SIDE * max(height, width), textures.shape[-1]
    choice = torch.randint(NUM_TEXTURES, (count,), generator=generator, device=device)
    top = torch.randint(full_side - height, (count,), generator=generator, device=device)
    left = torch.randint(full_side - width, (count,), generator=generator, device=device)
    if drawn_side == full_side:
        rows = (top[:, None] + torch.arange(height, device=device))[:, None, :, None]
        cols = (left[:, None] + torch.arange(width, device=device))[:, None, None, :]
        layers = torch.arange(channels, device=device)[None, :, None, None]
        return textures[choice[:, None, None, None], layers, rows, cols]
    scale = drawn_side / full_side
    rows = (top[:, None] + torch.arange(height, device=device) + 0.5) * scale  # in drawn pixels
    cols = (left[:, None] + torch.arange(width, device=device) + 0.5) * scale
    grid = torch.stack(torch.broadcast_tensors(cols[:, None, :], rows[:, :, None]), -1)
    grid = 2 * grid / drawn_side - 1  # align_corners=False: -1 and 1 are the outer pixel edges
    return F.grid_sample(textures[choice], grid.float(), mode="bilinear", padding_mode="border", align_corners=False)
