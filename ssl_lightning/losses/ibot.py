"""iBOT's masked image modelling loss: the student's prediction for each masked patch of a global crop
against the teacher's target for the same patch of the unmasked crop."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_lightning.distributed import all_reduce_sum
from ssl_lightning.losses.dino import CENTERINGS, dino_teacher_targets
from ssl_lightning.losses.sinkhorn import sinkhorn_knopp


@torch.no_grad()
def ibot_patch_targets(
    teacher_patch_logits: Tensor,
    temperature: float,
    centering: Literal["centre", "sinkhorn_knopp", "none"] = "centre",
    centre: Tensor | None = None,
    masked_positions: Tensor | None = None,
    sinkhorn_iterations: int = 3,
) -> Tensor:
    """The teacher's target distribution for every patch of every global crop.

    * ``"centre"`` (iBOT, Zhou et al. 2022, eq. 2; bytedance/ibot ``main_ibot.py`` ``iBOTLoss``, its
      ``center2``): ``softmax((t - c) / T_t)`` with the running patch centre ``c``, which
      :func:`~ssl_lightning.losses.dino.dino_centre_update` moves by the mean over every teacher patch of
      the global batch (iBOT's ``update_center``).
    * ``"sinkhorn_knopp"`` (DINOv2, Oquab et al. 2023; facebookresearch/dinov2
      ``dinov2/loss/ibot_patch_loss.py`` ``sinkhorn_knopp_teacher``): balanced assignments of the masked
      patches only, those of every rank together, to the K outputs
      (:func:`~ssl_lightning.losses.sinkhorn.sinkhorn_knopp`, ``epsilon = T_t``); the targets of unmasked
      patches, which the loss ignores, are zero.
    * ``"none"``: ``softmax(t / T_t)``.

    No gradient flows into the targets; computed in float32 (float64 stays float64), autocast off.

    Args:
        teacher_patch_logits: [C, L, K] teacher outputs of the L patches of this rank's C global crops.
        temperature: T_t.
        centering: "centre", "sinkhorn_knopp" or "none".
        centre: [1, K] running patch centre, with ``centering="centre"`` only.
        masked_positions: [M] long, the masked patches' indices in the flattened [C * L] patches
            (:class:`~ssl_lightning.components.masking.BlockMasks` ``positions``), with
            ``centering="sinkhorn_knopp"`` only: which patches Sinkhorn-Knopp balances.
        sinkhorn_iterations: Sinkhorn-Knopp rounds (DINOv2: 3).

    Returns:
        [C, L, K] target distributions (zero rows at unmasked patches with Sinkhorn-Knopp).
    """
    if teacher_patch_logits.dim() != 3:
        raise ValueError(
            f"ibot_patch_targets expects teacher patch logits [C, L, K] (crops, patches, outputs), got "
            f"{tuple(teacher_patch_logits.shape)}"
        )
    if centering not in CENTERINGS:
        raise ValueError(f"Unknown centering {centering!r}; valid values are {', '.join(CENTERINGS)}.")
    if (centering == "sinkhorn_knopp") != (masked_positions is not None):
        raise ValueError(
            f"ibot_patch_targets: centering={centering!r} "
            + ("needs masked_positions, the masked patches' flat indices (BlockMasks.positions)."
               if masked_positions is None else "takes no masked_positions; pass masked_positions=None.")
        )
    if centering != "sinkhorn_knopp":
        return dino_teacher_targets(teacher_patch_logits, temperature, centering, centre, sinkhorn_iterations)
    if temperature <= 0:
        raise ValueError(f"ibot_patch_targets needs a teacher temperature > 0, got {temperature}")
    dtype = torch.promote_types(teacher_patch_logits.dtype, torch.float32)
    with torch.autocast(teacher_patch_logits.device.type, enabled=False):
        logits = teacher_patch_logits.to(dtype).flatten(0, 1)
        # an index chosen on the host: selecting by the boolean mask would read its count from the device
        masked = sinkhorn_knopp(logits.index_select(0, masked_positions), temperature, sinkhorn_iterations)
        return torch.zeros_like(logits).index_copy_(0, masked_positions, masked).view_as(teacher_patch_logits)


def ibot_patch_loss(student_patch_logits: Tensor, teacher_targets: Tensor, masks: Tensor,
                    student_temperature: float = 0.1) -> Tensor:
    """iBOT's patch loss (Zhou et al. 2022, eq. 2; ``iBOTLoss.forward``, DINOv2's
    ``iBOTPatchLoss.forward_masked``), over the global batch:

        p_{c,l} = softmax(s_{c,l} / T_s)
        L = 1 / C sum_c [ sum_l m_{c,l} (- sum_k q_{c,l,k} log p_{c,l,k}) / max(1, sum_l m_{c,l}) ]

    with s_{c,l} the student's logits for patch l of its masked global crop c, q_{c,l} the teacher's
    target for the same patch of the unmasked crop, m_{c,l} = 1 where the student's patch was masked,
    and C the global crops of the global batch: each crop's mean over its masked patches, then the mean
    over the crops, unmasked crops counting 0 (iBOT averages per crop, then over both global crops'
    images; DINOv2 divides by all of them too). Unmasked patches take no part, whatever their targets.
    The per-rank sums are all-reduced, so every rank returns the global loss and the gradients follow
    ``ssl_lightning.distributed``'s convention.

    Args:
        student_patch_logits: [C, L, K] student outputs for the L patches of this rank's C masked crops.
        teacher_targets: [C, L, K] target distributions (:func:`ibot_patch_targets`); no gradient flows
            into them.
        masks: [C, L] bool (or 0/1), True where the student's patch was masked.
        student_temperature: T_s (iBOT: 0.1).

    Returns:
        The scalar loss, in float32 or the inputs' wider dtype.
    """
    if student_patch_logits.dim() != 3 or teacher_targets.shape != student_patch_logits.shape:
        raise ValueError(
            "ibot_patch_loss expects student logits and teacher targets of the same shape [C, L, K] (crops, patches, "
            f"outputs), got {tuple(student_patch_logits.shape)} and {tuple(teacher_targets.shape)}"
        )
    if masks.shape != student_patch_logits.shape[:2]:
        raise ValueError(
            f"ibot_patch_loss expects masks [C, L] = {tuple(student_patch_logits.shape[:2])} (one per patch of each "
            f"crop), got {tuple(masks.shape)}"
        )
    if student_temperature <= 0:
        raise ValueError(f"ibot_patch_loss needs a student temperature > 0, got {student_temperature}")

    dtype = torch.promote_types(student_patch_logits.dtype, torch.float32)
    with torch.autocast(student_patch_logits.device.type, enabled=False):
        masked = masks.to(torch.bool)
        log_predictions = F.log_softmax(student_patch_logits.to(dtype) / student_temperature, dim=-1)
        cross = -(teacher_targets.detach().to(dtype) * log_predictions).sum(dim=-1)  # [C, L]
        per_crop = torch.where(masked, cross, 0.0).sum(dim=-1) / masked.sum(dim=-1).clamp(min=1).to(dtype)
        num_crops = all_reduce_sum(torch.tensor(float(student_patch_logits.shape[0]), dtype=dtype,
                                                device=per_crop.device))
        return all_reduce_sum(per_crop.sum()) / num_crops
