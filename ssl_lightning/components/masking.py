"""Masking of a ViT's patch tokens for masked image modelling: MAE's random masking, the gather of the
kept tokens, iBOT's / DINOv2's blockwise masking, and the check that a backbone has patch tokens to mask
at all."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn


class PatchMask(NamedTuple):
    """Which of each image's L patches an encoder sees.

    ``ids_keep``: [N, K] long, the visible patches' positions, in the order the encoder receives
    them; ``ids_restore``: [N, L] long, the inverse permutation: gathering the tokens ``[visible...,
    masked...]`` with it puts them back in patch order; ``mask``: [N, L] float, 1 = masked (hidden),
    0 = visible, in patch order.
    """

    ids_keep: Tensor
    ids_restore: Tensor
    mask: Tensor


def num_visible_patches(num_patches: int, mask_ratio: float) -> int:
    """K = int(L (1 - mask_ratio)), the official ``len_keep`` (rounded down, as there)."""
    return int(num_patches * (1 - mask_ratio))


def random_masking(
    num_images: int,
    num_patches: int,
    mask_ratio: float,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> PatchMask:
    """MAE's per-image random masking (He et al. 2022, sec. 3; facebookresearch/mae ``models_mae.py``,
    ``random_masking``): each image draws uniform noise per patch and keeps the K patches with the
    smallest noise (K from :func:`num_visible_patches`), a uniformly random subset of the same size for
    every image. The kept patches come in ascending noise order, a random order, as in the official
    code (the encoder has no notion of order beyond the position embeddings already added).

    Everything stays on the device: an argsort of the noise and its inverse, no host sync.
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"random_masking needs 0 <= mask_ratio < 1, got {mask_ratio}")
    num_keep = num_visible_patches(num_patches, mask_ratio)
    if num_keep < 1:
        raise ValueError(
            f"random_masking: mask ratio {mask_ratio} keeps no patch of {num_patches}; lower the mask ratio "
            "or use more patches (a smaller patch size)."
        )
    noise = torch.rand(num_images, num_patches, device=device, generator=generator)
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: the smallest noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(num_images, num_patches, device=device)
    mask[:, :num_keep] = 0
    return PatchMask(ids_shuffle[:, :num_keep], ids_restore, torch.gather(mask, 1, ids_restore))


def gather_tokens(tokens: Tensor, ids: Tensor) -> Tensor:
    """``tokens[n, ids[n, k]]`` for every image n: [N, L, D] tokens and [N, K] positions -> [N, K, D]."""
    return torch.gather(tokens, 1, ids.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def check_patch_tokens(backbone: nn.Module, method: str, backbone_name: str) -> VisionTransformer:
    """The backbone as a timm ``VisionTransformer`` (patch embedding, prefix tokens, blocks), or a
    ValueError naming it: masking works on patch tokens, which a CNN's pooled features do not have."""
    if not isinstance(backbone, VisionTransformer):
        raise ValueError(
            f"{method} masks patch tokens, so it needs a timm ViT backbone (a VisionTransformer, e.g. "
            f"backbone: vit_small_patch16_224 with backbone_kwargs {{img_size: 32, patch_size: 4}}); the backbone "
            f"{backbone_name!r} ({type(backbone).__name__}) has no patch tokens."
        )
    return backbone


class BlockMasks(NamedTuple):
    """iBOT's masks of a batch of crops (:func:`ibot_block_masks`).

    ``mask``: [C, L] bool, True where the student sees the mask token instead of the patch, in patch
    order (row-major over the patch grid); ``positions``: [M] long, the masked patches' indices in
    ``mask.flatten()``, ascending. Both are made on the host, so M is known there without a device read.
    """

    mask: Tensor
    positions: Tensor


def add_random_block(mask: np.ndarray, budget: float, rng: random.Random, min_num_patches: float = 4,
                     min_aspect: float = 0.3) -> int:
    """Mask one random rectangle of ``mask`` (an [H, W] bool grid, changed in place), adding at most
    ``budget`` newly masked patches; the number added (0 after 10 failed draws).

    BEiT's block (Bao et al. 2022, Algorithm 1), as DINOv2's ``MaskingGenerator._mask``
    (facebookresearch/dinov2 ``dinov2/data/masking.py``) and iBOT's ``ImageFolderMask``
    (bytedance/ibot ``loader.py``) draw it: an area uniform in [min_num_patches, budget], a log-uniform
    aspect ratio in [min_aspect, 1 / min_aspect], height and width rounded from them and smaller than
    the grid's, a uniform position; kept if it adds between 1 and ``budget`` patches. The draws are
    the official ones in the same order, from ``rng``."""
    height, width = mask.shape
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    for _ in range(10):
        target_area = rng.uniform(min_num_patches, budget)
        aspect_ratio = math.exp(rng.uniform(*log_aspect))
        h = round(math.sqrt(target_area * aspect_ratio))
        w = round(math.sqrt(target_area / aspect_ratio))
        if w < width and h < height:
            top, left = rng.randint(0, height - h), rng.randint(0, width - w)
            block = mask[top: top + h, left: left + w]
            added = h * w - int(block.sum())
            if 0 < added <= budget:
                block[...] = True
                return added
    return 0


def block_mask(grid_size: Sequence[int], num_masking_patches: int, rng: random.Random, min_num_patches: float = 4,
               max_num_patches: float | None = None, min_aspect: float = 0.3) -> np.ndarray:
    """An [H, W] bool mask of about ``num_masking_patches`` patches in random rectangles (DINOv2's
    ``MaskingGenerator.__call__``): blocks (:func:`add_random_block`, each adding at most
    ``max_num_patches``) are added until the count is reached or a block cannot be placed, so the
    count never exceeds ``num_masking_patches`` and falls short only on grids too small for a block."""
    height, width = grid_size
    max_block = num_masking_patches if max_num_patches is None else max_num_patches
    mask = np.zeros((height, width), dtype=bool)
    count = 0
    while count < num_masking_patches:
        added = add_random_block(mask, min(num_masking_patches - count, max_block), rng, min_num_patches, min_aspect)
        if added == 0:
            break
        count += added
    return mask


def ibot_block_masks(
    num_crops: int,
    grid_size: Sequence[int],
    mask_ratio_range: Sequence[float] = (0.1, 0.5),
    mask_probability: float = 0.5,
    min_num_patches: float = 4,
    max_block_fraction: float = 0.5,
    min_aspect: float = 0.3,
    generator: torch.Generator | None = None,
) -> BlockMasks:
    """Blockwise masks for ``num_crops`` crops of ``grid_size`` = (H, W) patches, as DINOv2's
    ``collate_data_and_cast`` makes them (facebookresearch/dinov2 ``dinov2/data/collate.py``):
    ``int(num_crops * mask_probability)`` crops are masked, the i-th with a ratio drawn uniformly from
    the i-th of as many equal slices of ``mask_ratio_range`` (stratified, so the batch covers the range),
    by :func:`block_mask` with blocks of at most ``max_block_fraction`` of the patches; the others are
    left whole; then the crops' masks are shuffled. iBOT (``--pred_ratio 0 0.3 --pred_ratio_var 0 0.2``)
    draws the same distribution per crop independently: masked with probability 0.5, ratio uniform in
    [0.1, 0.5].

    Made on the host from sizes alone, with Python's ``random`` seeded by one draw from ``generator``
    (torch's global CPU generator when None: seeded runs repeat, and a resumed run's restored RNG state
    continues them); nothing is read from the device.
    """
    low, high = mask_ratio_range
    if not 0.0 <= low <= high < 1.0:
        raise ValueError(
            f"mask_ratio_range must satisfy 0 <= min <= max < 1 (the fractions of a crop's patches to mask), got "
            f"{tuple(mask_ratio_range)}; iBOT and DINOv2 use (0.1, 0.5)."
        )
    if not 0.0 <= mask_probability <= 1.0:
        raise ValueError(f"mask_probability must be in [0, 1] (the fraction of crops masked), got {mask_probability}")
    height, width = grid_size
    num_patches = height * width
    rng = random.Random(torch.randint(0, 2**62, (1,), generator=generator).tolist()[0])
    num_masked = int(num_crops * mask_probability)
    bounds = np.linspace(low, high, num_masked + 1)
    masks = [
        block_mask((height, width), int(num_patches * rng.uniform(bounds[i], bounds[i + 1])), rng, min_num_patches,
                   max_block_fraction * num_patches, min_aspect)
        for i in range(num_masked)
    ]
    masks += [np.zeros((height, width), dtype=bool) for _ in range(num_crops - num_masked)]
    rng.shuffle(masks)
    flat = np.stack(masks).reshape(num_crops, num_patches) if masks else np.zeros((0, num_patches), dtype=bool)
    return BlockMasks(torch.from_numpy(flat), torch.from_numpy(np.flatnonzero(flat)))
