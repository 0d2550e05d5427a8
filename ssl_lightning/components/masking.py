"""Masking of a ViT's patch tokens for masked image modelling: MAE's random masking, the gather of the
kept tokens, and the check that a backbone has patch tokens to mask at all."""

from __future__ import annotations

from typing import NamedTuple

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
