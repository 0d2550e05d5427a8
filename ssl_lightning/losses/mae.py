"""MAE's reconstruction loss (He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners"): the
mean squared error between the decoder's pixel predictions and the image's patches, on the masked
patches only, and the patch <-> image reshapes it needs (facebookresearch/mae ``models_mae.py``:
``patchify``, ``unpatchify``, ``forward_loss``)."""

from __future__ import annotations

import torch
from torch import Tensor

from ssl_lightning.distributed import all_reduce_sum

#: added to each patch's variance before the square root in the normalised-pixel target (the official 1.e-6)
NORM_PIX_EPS = 1e-6


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """``[N, C, H, W]`` images -> ``[N, L, p * p * C]`` patches, L = (H / p) (W / p), patches in row-major
    order (the ViT's token order), each flattened as (row in patch, column in patch, channel): the
    official ``patchify`` (``nchpwq -> nhwpqc``), here for any channel count and non-square images."""
    if images.dim() != 4:
        raise ValueError(f"patchify expects images [N, C, H, W], got shape {tuple(images.shape)}")
    n, c, height, width = images.shape
    p = patch_size
    if p < 1 or height % p or width % p:
        raise ValueError(
            f"patchify: the image size {height}x{width} must be a multiple of the patch size {p}; "
            "crop or resize the images to a multiple of the ViT's patch size."
        )
    h, w = height // p, width // p
    return images.reshape(n, c, h, p, w, p).permute(0, 2, 4, 3, 5, 1).reshape(n, h * w, p * p * c)


def unpatchify(patches: Tensor, patch_size: int, grid_size: tuple[int, int] | None = None) -> Tensor:
    """The inverse of :func:`patchify`: ``[N, L, p * p * C]`` -> ``[N, C, h p, w p]``. ``grid_size`` is
    (h, w) in patches; None means a square grid (the official ``unpatchify``)."""
    if patches.dim() != 3:
        raise ValueError(f"unpatchify expects patches [N, L, p*p*C], got shape {tuple(patches.shape)}")
    n, num_patches, patch_dim = patches.shape
    p = patch_size
    if grid_size is None:
        side = round(num_patches ** 0.5)
        grid_size = (side, side)
    h, w = grid_size
    if h * w != num_patches or p < 1 or patch_dim % (p * p):
        raise ValueError(
            f"unpatchify: {num_patches} patches of {patch_dim} values do not form a {h}x{w} grid of "
            f"{p}x{p} patches; pass grid_size=(rows, columns) and the patch size the patches were made with."
        )
    c = patch_dim // (p * p)
    return patches.reshape(n, h, w, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(n, c, h * p, w * p)


def normalised_pixel_target(patches: Tensor, eps: float = NORM_PIX_EPS) -> Tensor:
    """Each patch normalised by its own pixels: ``(x - mean) / sqrt(var + eps)``, mean and unbiased
    variance over the patch's p * p * C values (the official ``norm_pix_loss`` target, ``Tensor.var``'s
    default correction; the paper's Table 1d: better representations than raw pixels)."""
    if patches.shape[-1] < 2:
        raise ValueError(
            f"the normalised-pixel target needs patches of at least 2 values (a variance), got {patches.shape[-1]}; "
            "use a larger patch or norm_pix=False."
        )
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps).sqrt()


def mae_loss(pred: Tensor, target: Tensor, mask: Tensor, norm_pix: bool = True) -> Tensor:
    """MAE's loss (He et al. 2022, sec. 3, "Reconstruction target"; the official ``forward_loss``):

        e_il = mean over the patch's values of (pred_il - t_il)^2,   L = sum_il m_il e_il / sum_il m_il

    the squared error of each patch averaged over its pixels, then averaged over the masked patches
    (m = 1) of the global batch; visible patches (m = 0) add nothing. With ``norm_pix`` the target
    ``t`` is :func:`normalised_pixel_target` of the patches, else the patches themselves.

    The masked sum and count are all-reduced over the ranks, so every rank returns the mean over the
    global batch's masked patches (see ``ssl_lightning.distributed`` for the gradient convention).
    With MAE's fixed mask ratio and equal shards this is the official per-rank mean after DDP's
    averaging; with uneven shards every masked patch still weighs the same. No masked patch at all
    gives zero (with a graph). Computed in float32 (float64 stays float64), autocast off.

    Args:
        pred: [N, L, p * p * C] the decoder's prediction for every patch.
        target: [N, L, p * p * C] the image's patches (:func:`patchify`), not normalised.
        mask: [N, L], 1 where the patch was masked (hidden from the encoder), 0 where visible.
        norm_pix: regress normalised pixels (the paper's default for its best results).
    """
    if pred.dim() != 3 or pred.shape != target.shape:
        raise ValueError(
            f"mae_loss expects pred and target of the same shape [N, L, p*p*C], got {tuple(pred.shape)} "
            f"and {tuple(target.shape)}"
        )
    if mask.shape != pred.shape[:2]:
        raise ValueError(
            f"mae_loss expects a mask [N, L] = {tuple(pred.shape[:2])} (1 = masked patch), got {tuple(mask.shape)}"
        )
    dtype = torch.promote_types(pred.dtype, torch.float32)
    with torch.autocast(pred.device.type, enabled=False):
        target = target.to(dtype)
        if norm_pix:
            target = normalised_pixel_target(target)
        per_patch = (pred.to(dtype) - target).square().mean(dim=-1)
        mask = mask.to(dtype)
        loss_sum, count = all_reduce_sum(torch.stack([(per_patch * mask).sum(), mask.sum()]))
        return loss_sum / count.clamp(min=1)
