"""DINO's self-distillation: the teacher's targets (centred and sharpened) and the cross-entropy of
every student crop against every other crop's target."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_lightning.components.multicrop import cross_view_mask
from ssl_lightning.distributed import all_reduce_sum
from ssl_lightning.losses.sinkhorn import sinkhorn_knopp

CENTERINGS = ("centre", "sinkhorn_knopp", "none")


@torch.no_grad()
def dino_teacher_targets(
    teacher_logits: Tensor,
    temperature: float,
    centering: Literal["centre", "sinkhorn_knopp", "none"] = "centre",
    centre: Tensor | None = None,
    sinkhorn_iterations: int = 3,
) -> Tensor:
    """The teacher's target distributions over the K outputs, one per global crop and image.

    * ``"centre"`` (DINO, Caron et al. 2021, eq. 4 and Algorithm 1):
      ``softmax((t - c) / T_t)``: the running centre ``c`` (see :func:`dino_centre_update`) is
      subtracted, which keeps one output from dominating, and the low temperature ``T_t`` sharpens,
      which keeps the targets from going uniform; together they avoid collapse.
    * ``"sinkhorn_knopp"`` (DINOv2, Oquab et al. 2023, ``sinkhorn_knopp_teacher``): balanced
      assignments of the global batch's teacher outputs, all crops together, to the K outputs:
      :func:`~ssl_lightning.losses.sinkhorn.sinkhorn_knopp` with ``epsilon = T_t`` and 3 iterations.
    * ``"none"``: ``softmax(t / T_t)`` (Random Teachers, Sarnthein et al. 2023, with ``T_t = 1``).

    The targets carry no gradient. Computed in float32 (float64 stays float64), autocast off.

    Args:
        teacher_logits: [T, N, K] teacher outputs of T global crops of this rank's N images.
        temperature: the teacher temperature T_t (DINO: 0.04 rising to 0.07).
        centering: "centre", "sinkhorn_knopp" or "none".
        centre: [1, K] or [K] running centre, needed with ``centering="centre"`` only.
        sinkhorn_iterations: Sinkhorn-Knopp rounds (DINOv2: 3).

    Returns:
        [T, N, K] target distributions.
    """
    if teacher_logits.dim() != 3:
        raise ValueError(f"dino_teacher_targets expects teacher logits [T, N, K], got {tuple(teacher_logits.shape)}")
    if centering not in CENTERINGS:
        raise ValueError(f"Unknown centering {centering!r}; valid values are {', '.join(CENTERINGS)}.")
    if temperature <= 0:
        raise ValueError(f"dino_teacher_targets needs a teacher temperature > 0, got {temperature}")
    if (centering == "centre") != (centre is not None):
        raise ValueError(
            f"dino_teacher_targets: centering={centering!r} "
            + ("needs the running centre [1, K]." if centre is None else "takes no centre; pass centre=None.")
        )
    dtype = torch.promote_types(teacher_logits.dtype, torch.float32)
    with torch.autocast(teacher_logits.device.type, enabled=False):
        logits = teacher_logits.to(dtype)
        if centering == "sinkhorn_knopp":
            crops = sinkhorn_knopp(logits.flatten(0, 1), epsilon=temperature, iterations=sinkhorn_iterations)
            return crops.view_as(logits)
        if centering == "centre":
            logits = logits - centre.to(dtype).reshape(1, 1, -1)
        return F.softmax(logits / temperature, dim=-1)


@torch.no_grad()
def dino_centre_update(centre: Tensor, teacher_logits: Tensor, momentum: float = 0.9) -> Tensor:
    """DINO's centre after one step: ``c <- m c + (1 - m) mean(t)`` (Caron et al. 2021, eq. 4, m = 0.9).

    The mean runs over every teacher output of the step: the T global crops of the global batch's
    images (the official ``update_center`` all-reduces the sum over the processes and divides by
    all of their rows; here the row count is all-reduced too, so uneven shards give the mean of one
    process on the concatenated batch). Every rank returns the same centre.

    Args:
        centre: [1, K] current centre.
        teacher_logits: [T, N, K] (or [R, K]) raw teacher outputs, before centring and temperature.
        momentum: m, the weight of the old centre.

    Returns:
        The new [1, K] centre, in ``centre``'s dtype.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"dino_centre_update needs 0 <= momentum <= 1, got {momentum}")
    rows = teacher_logits.reshape(-1, teacher_logits.shape[-1])
    if centre.numel() != rows.shape[-1]:
        raise ValueError(f"dino_centre_update: a centre of {centre.numel()} entries for {rows.shape[-1]} outputs")
    dtype = torch.promote_types(centre.dtype, torch.float32)
    with torch.autocast(rows.device.type, enabled=False):
        rows = rows.to(dtype)
        # one collective: the column sums and the row count travel together
        totals = all_reduce_sum(torch.cat([rows.sum(dim=0), rows.new_tensor([rows.shape[0]])]))
        batch_centre = (totals[:-1] / totals[-1]).view_as(centre)
        return (momentum * centre.to(dtype) + (1.0 - momentum) * batch_centre).to(centre.dtype)


def dino_loss(student_logits: Tensor, teacher_targets: Tensor, student_temperature: float = 0.1) -> Tensor:
    """DINO's loss (Caron et al. 2021, eq. 3 and Algorithm 1), over the global batch:

        p_{j,n} = softmax(s_{j,n} / T_s)
        L = 1 / (|P| B) sum_{(i, j) in P} sum_n  - sum_k q_{i,n,k} log p_{j,n,k}

    with q_{i,n} the teacher's target for global crop i of image n, s_{j,n} the student's logits for
    crop j, B the images of the global batch, and P the pairs (i, j) with i != j
    (:func:`~ssl_lightning.components.multicrop.cross_view_pairs`): the student's first T crops are
    the teacher's, and no crop predicts its own target. This is the official average: the sum over
    pairs of each pair's batch mean, divided by the number of pairs. The per-rank sums are
    all-reduced, so every rank returns the global loss and gradients follow
    ``ssl_lightning.distributed``'s convention.

    Args:
        student_logits: [S, N, K] student outputs of all S crops (global first) of this rank's N images.
        teacher_targets: [T, N, K] target distributions of the T global crops
            (:func:`dino_teacher_targets`); no gradient flows into them.
        student_temperature: T_s (DINO: 0.1).

    Returns:
        The scalar loss, in float32 or the inputs' wider dtype.
    """
    if student_logits.dim() != 3 or teacher_targets.dim() != 3 or teacher_targets.shape[1:] != student_logits.shape[1:]:
        raise ValueError(
            "dino_loss expects student logits [S, N, K] and teacher targets [T, N, K] of the same N images and K "
            f"outputs, got {tuple(student_logits.shape)} and {tuple(teacher_targets.shape)}"
        )
    num_student, num_teacher = student_logits.shape[0], teacher_targets.shape[0]
    if not 1 <= num_teacher <= num_student or num_student < 2:
        raise ValueError(
            f"dino_loss needs at least 2 student crops and targets for 1 to all of them (the teacher's crops are the "
            f"student's first ones): got {num_teacher} teacher and {num_student} student crops"
        )
    if student_temperature <= 0:
        raise ValueError(f"dino_loss needs a student temperature > 0, got {student_temperature}")

    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    with torch.autocast(student_logits.device.type, enabled=False):
        log_predictions = F.log_softmax(student_logits.to(dtype) / student_temperature, dim=-1)
        # cross[i, j] = -sum_n sum_k q_{i,n,k} log p_{j,n,k}: every (target, student crop) pair at once
        cross = -torch.einsum("ink,jnk->ij", teacher_targets.detach().to(dtype), log_predictions)
        pairs = cross_view_mask(num_teacher, num_student, device=cross.device)
        local_sum = cross.masked_fill(~pairs, 0.0).sum()
        num_images = all_reduce_sum(torch.tensor(float(student_logits.shape[1]), dtype=dtype, device=cross.device))
        num_pairs = num_teacher * num_student - num_teacher
        return all_reduce_sum(local_sum) / (num_images * num_pairs)
