"""Rotation label augmentation, shared by SLA and LSSKD: the four-rotation batch, the joint (class x
rotation) labels and the reading of class logits out of joint logits.

Self-supervised label augmentation (Lee, Hwang and Shin, ICML 2020, "Self-supervised Label Augmentation
via Input Transformations") trains one classifier over the joint labels (class y, rotation j) of every
image rotated by 0, 90, 180 and 270 degrees. The layout follows the official code (hankook/SLA,
``augmentations.py`` ``rotation`` and ``trainers.py``), which LSSKD's relative HSAKD (winycg/HSAKD,
``train_student_cifar.py``) copies:

* the rotated batch interleaves each image's rotations: row ``4 i + j`` is image i rotated j times by 90
  degrees (``torch.rot90`` over the height and width), so an image's four rows stay together and a
  batch split over ranks rotates to the same rows as the whole batch;
* the joint label of class y at rotation j is ``4 y + j``: column ``4 c + j`` of the joint logits scores
  class c at rotation j;
* the class logits of the rotated input j are its joint logits at rotation j's own entries (columns
  ``j, 4 + j, 8 + j, ...``). SLA+SI reads them at rotation 0 (``preds[::4, ::4]``); SLA+AG averages them
  over the four rotations (``sum_j preds[j::4, j::4] / 4``), the paper's aggregated prediction
  ``softmax(1/M sum_j z_(i, j))``, a mean of logits, not of probabilities.

The rotations run on the device inside the training step: the DataModule still makes one view.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: rotations by 0, 90, 180 and 270 degrees (SLA's and HSAKD's M = 4)
NUM_ROTATIONS = 4


def rotate_batch(images: Tensor) -> Tensor:
    """``[B, C, H, W]`` images -> ``[4 B, C, H, W]``: row ``4 i + j`` is image i rotated by ``j x 90``
    degrees counter-clockwise (``torch.rot90(x, j, (2, 3))``). Square images only: a quarter turn
    swaps height and width."""
    if images.dim() != 4 or images.shape[-1] != images.shape[-2]:
        raise ValueError(
            f"rotation label augmentation needs square images [B, C, H, H] (a 90-degree rotation swaps height "
            f"and width), got shape {tuple(images.shape)}. Use a square crop (crop_size) or resize in the views."
        )
    return torch.stack([torch.rot90(images, j, (2, 3)) for j in range(NUM_ROTATIONS)], dim=1).flatten(0, 1)


def joint_labels(labels: Tensor) -> Tensor:
    """``[B]`` class labels -> ``[4 B]`` joint labels ``4 y + j`` in the rotated batch's row order; an
    unlabelled image (-1) gives four unlabelled rows (-1)."""
    if labels.dim() != 1 or labels.is_floating_point():
        raise ValueError(f"joint_labels expects integer class labels of shape [B], got {labels.dtype} "
                         f"of shape {tuple(labels.shape)}")
    rotations = torch.arange(NUM_ROTATIONS, device=labels.device)
    joint = labels.unsqueeze(1) * NUM_ROTATIONS + rotations
    return torch.where(labels.unsqueeze(1) >= 0, joint, torch.full_like(joint, -1)).flatten()


def _check_joint(joint_logits: Tensor, rotated_rows: bool) -> None:
    rows, columns = joint_logits.shape if joint_logits.dim() == 2 else (None, None)
    if rows is None or columns % NUM_ROTATIONS or (rotated_rows and rows % NUM_ROTATIONS):
        what = "[4 B, 4 C] (the rotated batch's rows)" if rotated_rows else "[N, 4 C]"
        raise ValueError(
            f"joint logits must be {what}, with 4 columns per class (class c at rotation j is column 4 c + j), "
            f"got shape {tuple(joint_logits.shape)}. Build the joint head with {NUM_ROTATIONS} x num_classes "
            "outputs and run it on rotate_batch(images)."
        )


def class_logits_at(joint_logits: Tensor, rotation: int) -> Tensor:
    """``[N, 4 C]`` joint logits -> ``[N, C]``: every row's class logits at rotation ``rotation``'s entries
    (columns ``rotation::4``). On un-rotated images, rotation 0 is SLA+SI's prediction."""
    _check_joint(joint_logits, rotated_rows=False)
    return joint_logits[:, rotation::NUM_ROTATIONS]


def per_rotation_class_logits(joint_logits: Tensor) -> Tensor:
    """``[4 B, 4 C]`` joint logits of the rotated batch -> ``[B, 4, C]``: entry ``[i, j, c]`` is the score of
    class c at rotation j for image i rotated j times, ``joint_logits[4 i + j, 4 c + j]``."""
    _check_joint(joint_logits, rotated_rows=True)
    rows, columns = joint_logits.shape
    blocks = joint_logits.reshape(rows // NUM_ROTATIONS, NUM_ROTATIONS, columns // NUM_ROTATIONS, NUM_ROTATIONS)
    # [i, j, c, k] = joint_logits[4 i + j, 4 c + k]; the input's own rotation is k = j
    return torch.diagonal(blocks, dim1=1, dim2=3).transpose(1, 2)


def single_logits(joint_logits: Tensor) -> Tensor:
    """SLA+SI: ``[4 B, 4 C]`` -> ``[B, C]``, the un-rotated input's class logits at rotation 0
    (the official ``preds[::4, ::4]``)."""
    return per_rotation_class_logits(joint_logits)[:, 0]


def aggregated_logits(joint_logits: Tensor) -> Tensor:
    """SLA+AG: ``[4 B, 4 C]`` -> ``[B, C]``, the mean over the four rotated inputs of each one's class
    logits at its own rotation (the official ``sum_j preds[j::4, j::4] / 4``)."""
    return per_rotation_class_logits(joint_logits).mean(dim=1)
