"""BYOL's normalised regression loss."""

import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_lightning.distributed import all_reduce_sum
from ssl_lightning.losses._checks import check_paired_rows


def normalized_regression(p: Tensor, z: Tensor) -> Tensor:
    """Squared error of L2-normalised prediction and target (Grill et al. 2020, BYOL, eq. 2).

        L = mean_i || p_i / ||p_i|| - z_i / ||z_i|| ||^2 = mean_i (2 - 2 cos(p_i, z_i))

    over the global batch (all ranks). ``z`` is the target network's projection; the caller
    detaches it (gradients flow into ``z`` if it requires them). BYOL symmetrises by adding the
    loss with the views swapped; that is the caller's job too.

    The per-rank sums and counts are all-reduced, so every rank returns the global mean, even
    for uneven shards (see ``ssl_lightning.distributed`` for the gradient convention).

    Args:
        p: [N, D] online predictions.
        z: [N, D] targets, row i paired with row i of ``p``.

    Returns:
        The scalar loss, in the input dtype, or in float32 for lower-precision inputs.
    """
    check_paired_rows("normalized_regression", p, z, names=("p", "z"))

    # Half precision rounds cos to ~3 digits; autocast would re-lower the products.
    dtype = torch.promote_types(p.dtype, torch.float32)
    with torch.autocast(p.device.type, enabled=False):
        cosine = (F.normalize(p.to(dtype), dim=1) * F.normalize(z.to(dtype), dim=1)).sum(dim=1)
        local_sum_and_count = torch.stack([(2 - 2 * cosine).sum(), cosine.new_tensor(p.shape[0])])
        loss_sum, count = all_reduce_sum(local_sum_and_count)
        return loss_sum / count
