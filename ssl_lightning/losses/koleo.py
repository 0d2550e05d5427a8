"""KoLeo: the Kozachenko-Leonenko differential-entropy estimator as a regulariser that spreads a batch's
embeddings over the sphere."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def koleo_loss(embeddings: Tensor, eps: float = 1e-8) -> Tensor:
    """KoLeo (Sablayrolles et al., ICLR 2019, "Spreading vectors for similarity search", eq. 4), as DINOv2
    applies it to the student's [CLS] tokens (Oquab et al. 2023, sec. 4; facebookresearch/dinov2
    ``dinov2/loss/koleo_loss.py``):

        x_i = z_i / max(||z_i||, eps)
        d_i = || x_i - x_{n(i)} + eps ||,   n(i) = argmax_{j != i} <x_i, x_j>
        L = - 1 / N sum_i log(d_i + eps)

    the distance of each L2-normalised embedding to its nearest neighbour in the batch (the largest
    inner product; ``eps`` added to the difference as ``nn.PairwiseDistance`` does). Small distances
    are penalised, so the embeddings spread out. The neighbour is chosen without gradient; the
    gradient flows through both ends of each distance.

    Computed on this rank's N rows only, as DINOv2 does (no gather: the nearest neighbour is searched in
    the local batch, and DDP averages the ranks' gradients). Float32 (float64 stays float64), autocast off.

    Args:
        embeddings: [N, D], N >= 2.
        eps: the normalisation's and the distance's epsilon (DINOv2: 1e-8).

    Returns:
        The scalar loss.
    """
    if embeddings.dim() != 2 or embeddings.shape[0] < 2:
        raise ValueError(
            f"koleo_loss expects embeddings [N, D] with N >= 2 (each row's nearest neighbour is another row of the "
            f"batch), got {tuple(embeddings.shape)}; use batches of at least 2 images per process (drop_last)."
        )
    dtype = torch.promote_types(embeddings.dtype, torch.float32)
    with torch.autocast(embeddings.device.type, enabled=False):
        x = F.normalize(embeddings.to(dtype), p=2, dim=-1, eps=eps)
        with torch.no_grad():
            dots = x @ x.T
            # itself is no neighbour: the diagonal below any cosine (DINOv2's -1 would tie with an antipodal row)
            dots.fill_diagonal_(-2.0)
            nearest = dots.argmax(dim=1)
        distances = (x - x.index_select(0, nearest) + eps).norm(dim=-1)
        return -torch.log(distances + eps).mean()
