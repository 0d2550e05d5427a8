"""Multi-crop (Caron et al. 2020, SwAV; Caron et al. 2021, DINO): a few global crops and several small
local crops of each image, in one list of views, global crops first.

Two rules that every multi-crop method (SwAV, DINO, iBOT) shares:

* The backbone runs once per crop resolution, not once per crop: consecutive views of one size are
  concatenated into one batch, run, and the outputs come back in view order (the official
  ``MultiCropWrapper`` of DINO, SwAV's ``forward`` over ``idx_crops``). With BatchNorm backbones this
  also decides the normalisation batches: all crops of one resolution together, as in the papers.
* The teacher (or the code / target side) sees only the global crops, the first ``num_global`` views;
  the loss pairs teacher crop ``i`` with student crop ``j`` for every ``i != j``: a global crop never
  predicts its own target, and local crops predict every global crop.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def same_size_runs(views: Sequence[Tensor]) -> list[list[Tensor]]:
    """Consecutive views of one shape, grouped (the global crops, then the local ones)."""
    runs: list[list[Tensor]] = []
    for view in views:
        if runs and runs[-1][0].shape == view.shape:
            runs[-1].append(view)
        else:
            runs.append([view])
    return runs


def forward_per_resolution(module: nn.Module, views: Sequence[Tensor]) -> Tensor:
    """``module`` on every view, one call per run of equal-size views: ``[V * N, ...]``, the outputs of
    view 0's ``N`` images first, then view 1's, and so on (``.view(V, N, -1)`` splits them back)."""
    return torch.cat([module(torch.cat(run)) for run in same_size_runs(views)])


def global_views(views: Sequence[Tensor], num_global: int, method: str) -> list[Tensor]:
    """The first ``num_global`` views, the teacher's inputs; they must be global crops of one size.

    Shapes are Python ints, so the check costs no host sync. A recipe whose second view is already a
    local crop (one global crop) is an error, not a teacher run on a local crop.
    """
    if len(views) < num_global or len({tuple(view.shape) for view in views[:num_global]}) != 1:
        sizes = [tuple(view.shape[-2:]) for view in views]
        raise ValueError(
            f"{method}: the teacher takes the first {num_global} views, which must be global crops of one size, "
            f"but the batch's views have sizes {sizes}. The view recipe must start with {num_global} global crops: "
            f"use data.views: dino ({num_global} global + local crops) or a {num_global}-view recipe (simclr, byol)."
        )
    return list(views[:num_global])


def check_global_crops(crop_sizes: Sequence[int], num_global: int, method: str, recipe: object) -> None:
    """The same rule as :func:`global_views`, on a DataModule's recipe before training: ``crop_sizes``
    lists every view's crop size in order; ``recipe`` is what the user set (``data.views``)."""
    if len(crop_sizes) < num_global or len(set(crop_sizes[:num_global])) != 1:
        raise ValueError(
            f"{method} needs a view recipe that starts with {num_global} global crops of one size (the teacher's "
            f"inputs), but data.views={recipe!r} makes crops of sizes {list(crop_sizes)}. Use data.views: dino "
            f"({num_global} global + local crops) or a {num_global}-view recipe (simclr, byol)."
        )


def check_backbone_takes_every_size(backbone: nn.Module, crop_sizes: Sequence[int], method: str) -> None:
    """A timm ViT built for one input size fails on local crops (timm asserts mid-step); say how to fix
    it before training. Other backbones (ResNets: global pooling) take any size."""
    patch_embed = getattr(backbone, "patch_embed", None)
    sizes = sorted(set(crop_sizes), reverse=True)
    if len(sizes) < 2 or patch_embed is None or not hasattr(backbone, "dynamic_img_size"):
        return
    name, patch = type(backbone).__name__, patch_embed.patch_size[0]
    if not backbone.dynamic_img_size:
        raise ValueError(
            f"{method}: the view recipe has crops of sizes {sizes}, but the backbone {name} takes one input size. "
            f"Build it with backbone_kwargs dynamic_img_size: true (timm then interpolates the position embeddings "
            f"for each crop size, as DINO's ViT does)."
        )
    if not getattr(patch_embed, "dynamic_img_pad", False) and any(size % patch for size in sizes):
        raise ValueError(
            f"{method}: the view recipe has crops of sizes {sizes}, not all divisible by the backbone's patch size "
            f"{patch}. Choose crop sizes that are multiples of {patch}, or set backbone_kwargs dynamic_img_pad: true."
        )


def cross_view_pairs(num_teacher_views: int, num_student_views: int) -> list[tuple[int, int]]:
    """Every (teacher crop ``i``, student crop ``j``) pair the loss sums, ``i != j``: the teacher's crops are
    the student's first ``num_teacher_views`` crops, and no crop predicts itself."""
    return [(i, j) for i in range(num_teacher_views) for j in range(num_student_views) if i != j]


def cross_view_mask(num_teacher_views: int, num_student_views: int, device: torch.device | None = None) -> Tensor:
    """:func:`cross_view_pairs` as a boolean ``[T, S]`` mask (True: the pair is summed), for losses that
    compute every pair at once."""
    return ~torch.eye(num_teacher_views, num_student_views, dtype=torch.bool, device=device)
