"""Mixed Barlow Twins' mixup regulariser of the cross-correlations."""

from __future__ import annotations

import torch
from torch import Tensor

from ssl_lightning.distributed import all_reduce_sum
from ssl_lightning.losses._batch_stats import centre_over_global_batch
from ssl_lightning.losses._checks import check_paired_rows


def mixed_barlow_twins_regulariser(
    z1: Tensor,
    z2: Tensor,
    z_mixed: Tensor,
    perm: Tensor,
    mix_ratio: float | Tensor,
    eps: float = 1e-5,
) -> Tensor:
    """Mixup regulariser of Mixed Barlow Twins (Bandara et al., "Guarding Barlow Twins Against
    Overfitting with Mixed Samples", 2023, eq. 5-7; github.com/wgcban/mix-bt, main.py).

    The mixed images are ``x_m = lambda x1 + (1 - lambda) x2[perm]``; if the embedding were linear,
    their cross-correlations with either view would be the same mixture of the views' own:

        C(Z^M, Z^A)_gt = lambda C(Z^A, Z^A) + (1 - lambda) C(Z^B[perm], Z^A)
        C(Z^M, Z^B)_gt = lambda C(Z^A, Z^B) + (1 - lambda) C(Z^B[perm], Z^B)
        R = ||C(Z^M, Z^A) - C(Z^M, Z^A)_gt||_F^2 + ||C(Z^M, Z^B) - C(Z^M, Z^B)_gt||_F^2

    with ``C(X, Y) = Xn^T Yn / N'`` over the global batch of N' rows, every embedding standardised
    per dimension over that batch. Both differences share the factor (Zn^M - lambda Zn^A -
    (1 - lambda) Zn^B[perm]), so each is a single product. The method weights R by
    ``reg_scale * lambda_BT`` (main.py's ``mixup_loss_scale * lmbda``).

    Departure: the standardisation is that of :func:`ssl_lightning.losses.barlow_twins` (biased
    variance, ``eps`` inside the square root, as BatchNorm does) so that C(Z^A, Z^B) here is the
    matrix the Barlow Twins term uses; mix-bt's main.py divides by the unbiased std without
    ``eps``, which scales every entry of C by (N' - 1) / N'.

    Distributed: ``perm`` permutes this rank's rows (the images are mixed where they live), so on
    the concatenated batch it is the block-diagonal permutation; ``mix_ratio`` may be a
    ``[N]`` tensor, one value per row, which is what different ranks drawing their own lambda
    amounts to. Only per-dimension sums and the two D x D matrices are all-reduced (three
    collectives); every rank returns the global value (see ``ssl_lightning.distributed``).

    Args:
        z1: [N, D] projections of the first views, N >= 2 per process.
        z2: [N, D] projections of the second views, row b paired with row b of ``z1``.
        z_mixed: [N, D] projections of the mixed images, row b made from ``x1[b]`` and ``x2[perm[b]]``.
        perm: [N] integer permutation of this process's rows used to mix the images.
        mix_ratio: lambda, the weight of ``x1`` in the mix: a number, a 0-d tensor or an [N] tensor.
        eps: added to the variance before the square root.

    Returns:
        The scalar R (unweighted), in the input dtype, or in float32 for lower-precision inputs.
    """
    check_paired_rows("mixed_barlow_twins_regulariser", z1, z2)
    check_paired_rows("mixed_barlow_twins_regulariser", z1, z_mixed, names=("z1", "z_mixed"))
    n = z1.shape[0]
    if n < 2:
        raise ValueError(
            f"mixed_barlow_twins_regulariser needs at least 2 samples per process to standardise "
            f"each dimension, got z1, z2 and z_mixed of shape {tuple(z1.shape)}"
        )
    if perm.shape != (n,) or perm.is_floating_point():
        raise ValueError(
            f"mixed_barlow_twins_regulariser expects perm to be the [N] = [{n}] integer permutation "
            f"used to mix the images, got {perm.dtype} of shape {tuple(perm.shape)}"
        )
    if isinstance(mix_ratio, Tensor) and mix_ratio.shape not in ((), (n,)):
        raise ValueError(
            f"mixed_barlow_twins_regulariser expects mix_ratio to be a number, a 0-d tensor or one "
            f"value per row ([{n}]), got shape {tuple(mix_ratio.shape)}"
        )

    # The D x D products and per-dimension sums lose precision in half precision; autocast
    # would re-lower the matmuls.
    dtype = torch.promote_types(z1.dtype, torch.float32)
    with torch.autocast(z1.device.type, enabled=False):
        centred, n_global = centre_over_global_batch(z1.to(dtype), z2.to(dtype), z_mixed.to(dtype))
        centred = torch.stack(centred)  # [3, N, D]
        variances = all_reduce_sum(centred.pow(2).sum(dim=1)) / n_global
        zn1, zn2, zn_mixed = centred / (variances + eps).sqrt()[:, None, :]

        if isinstance(mix_ratio, Tensor):
            mix_ratio = mix_ratio.to(dtype).reshape(-1, 1)  # a row weight, or one for all rows
        linear_prediction = mix_ratio * zn1 + (1 - mix_ratio) * zn2[perm]
        miss = zn_mixed - linear_prediction
        local_products = torch.stack([miss.T @ zn1, miss.T @ zn2])
        differences = all_reduce_sum(local_products) / n_global
        return differences.pow(2).sum()
