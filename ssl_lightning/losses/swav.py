"""SwAV's swapped prediction: predict one crop's code from every other crop."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_lightning.distributed import all_reduce_sum


def swapped_prediction(scores: Tensor, codes: Tensor, temperature: float = 0.1) -> Tensor:
    """SwAV's loss (Caron et al. 2020, eq. 1-2 with multi-crop), over the global batch.

    With z_{v,n} the normalised projection of crop v of image n, c_k the prototypes,
    p_{v,n} = softmax(z_{v,n}^T C / t) and q_{a,n} the code (Sinkhorn-Knopp assignment) of
    assigned crop a, every other crop of the same image predicts that code:

        l(a, v) = -(1 / B) sum_n sum_k q_{a,n,k} log p_{v,n,k}
        L       = 1 / (A (V - 1)) sum_a sum_{v != a} l(a, v)

    over the A assigned crops (the first A crops: SwAV's ``crops_for_assign`` 0 and 1, the global
    crops) and the V crops, B images of the global batch: the official code's
    ``loss / (len(crops_for_assign) * (sum(nmb_crops) - 1))``. The codes are targets: no gradient
    flows into them. The per-rank sums are all-reduced, so every rank returns the global loss and
    gradients follow ``ssl_lightning.distributed``'s convention.

    Args:
        scores: [V, N, K] scores of every crop of this rank's N images against the K prototypes.
        codes: [A, N, K] codes of the first A crops, each row a distribution over the prototypes.
        temperature: softmax temperature t > 0 of the predictions (SwAV: 0.1).

    Returns:
        The scalar loss, in float32 or the inputs' wider dtype.
    """
    if scores.dim() != 3 or codes.dim() != 3 or codes.shape[1:] != scores.shape[1:]:
        raise ValueError(
            "swapped_prediction expects scores [V, N, K] and codes [A, N, K] of the same N images and K "
            f"prototypes, got {tuple(scores.shape)} and {tuple(codes.shape)}"
        )
    num_crops, num_assigned = scores.shape[0], codes.shape[0]
    if num_crops < 2 or not 1 <= num_assigned <= num_crops:
        raise ValueError(
            f"swapped_prediction needs at least 2 crops (a crop does not predict its own code) and codes for 1 "
            f"to all of them: got codes for {num_assigned} of {num_crops} crops"
        )
    if temperature <= 0:
        raise ValueError(f"swapped_prediction needs temperature > 0, got {temperature}")

    dtype = torch.promote_types(scores.dtype, torch.float32)
    with torch.autocast(scores.device.type, enabled=False):
        log_predictions = F.log_softmax(scores.to(dtype) / temperature, dim=-1)
        # cross[a, v] = -sum_n sum_k q_{a,n,k} log p_{v,n,k}: every (code, predicting crop) pair
        cross = -torch.einsum("ank,vnk->av", codes.detach().to(dtype), log_predictions)
        same_crop = torch.eye(num_assigned, num_crops, dtype=torch.bool, device=scores.device)
        local_sum = cross.masked_fill(same_crop, 0.0).sum()
        num_images = all_reduce_sum(torch.tensor(float(scores.shape[1]), dtype=dtype, device=scores.device))
        return all_reduce_sum(local_sum) / (num_images * num_assigned * (num_crops - 1))
