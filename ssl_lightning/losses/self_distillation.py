"""The distillation term of self-distillation for further pre-training (Lee, Kang, Lee, Hwang, Kawaguchi,
ICLR 2023, "Self-Distillation for Further Pre-training of Transformers"): the squared Euclidean distance
between the student's hidden representation of an image and the frozen teacher's."""

from __future__ import annotations

import torch
from torch import Tensor

from ssl_lightning.distributed import all_reduce_sum
from ssl_lightning.losses._checks import check_paired_rows


def self_distillation_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """The paper's distillation loss, pulling the student's representation towards the teacher's:

        L_distill = 1/n sum_i || h_s(x_i) - StopGrad(h_t(x_i)) ||_2^2

    squared differences summed over the D features, averaged over the n images of the global batch
    (the official seanie12/self-distillation ``trainer.py``, ``SelfPreTrainer``: ``MSELoss(reduction="sum")``
    divided by the batch size). ``teacher`` is a target: it is detached here (the paper's StopGrad), so
    only ``student`` receives a gradient, ``2 (h_s - h_t) / n`` per row.

    The per-rank sums and row counts are all-reduced, so every rank returns the mean over the global
    batch, even for uneven shards (see ``ssl_lightning.distributed``); with equal shards this is the
    official per-process loss after DDP's averaging. An empty global batch gives zero (with a graph).
    Computed in float32 (float64 stays float64), autocast off.

    Args:
        student: [N, D] the student's representations (the method's: the encoder's pooled features of
            the unmasked image, the class token for timm's default pooling).
        teacher: [N, D] the teacher's representations of the same images, row i paired with row i.

    Returns:
        The scalar loss.
    """
    check_paired_rows("self_distillation_loss", student, teacher, ("student", "teacher"))
    dtype = torch.promote_types(student.dtype, torch.float32)
    with torch.autocast(student.device.type, enabled=False):
        squared = (student.to(dtype) - teacher.detach().to(dtype)).square().sum(dim=1)
        total, count = all_reduce_sum(torch.stack([squared.sum(), squared.new_tensor(student.shape[0])]))
        return total / count.clamp(min=1)
