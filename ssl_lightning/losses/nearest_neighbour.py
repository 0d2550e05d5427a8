"""Nearest neighbours in a support set: NNCLR's positives."""

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def nearest_neighbours(z: Tensor, support: Tensor) -> Tensor:
    """The row of ``support`` most cosine-similar to each row of ``z`` (Dwibedi et al. 2021, NNCLR,
    eq. 2): ``NN(z, Q) = argmin_{q in Q} || z/||z|| - q/||q|| ||``, which is the argmax of the
    cosine similarity.

    The lookup is a matmul and an argmax on the device (the host never waits for it), in float32
    whatever the input dtype, so that mixed precision does not change which neighbour wins. The
    result carries no gradient: NNCLR's positives come from the queue, not from the network
    (argmax has no gradient anyway).

    Args:
        z: [N, D] embeddings to look up; need not be normalised.
        support: [K, D] support set (NNCLR's queue of past projections).

    Returns:
        [N, D]: the chosen rows of ``support`` as stored (not re-normalised), in its dtype.
    """
    if z.dim() != 2 or support.dim() != 2 or z.shape[1] != support.shape[1]:
        raise ValueError(
            f"nearest_neighbours expects z [N, D] and support [K, D] of the same width D, "
            f"got {tuple(z.shape)} and {tuple(support.shape)}"
        )
    if support.shape[0] == 0:
        raise ValueError("nearest_neighbours needs a non-empty support set")
    dtype = torch.promote_types(torch.promote_types(z.dtype, support.dtype), torch.float32)
    with torch.autocast(z.device.type, enabled=False):
        similarity = F.normalize(z.to(dtype), dim=1) @ F.normalize(support.to(dtype), dim=1).T
        return support.index_select(0, similarity.argmax(dim=1))
