"""iSogCLR's robust global contrastive loss with individualised temperatures (Qiu et al., ICML 2023)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_lightning.distributed import all_reduce_sum, gather, rank
from ssl_lightning.losses._checks import check_paired_rows


class ISogCLRStep(NamedTuple):
    """What one step of iSogCLR computes for the images of this rank's batch."""

    #: the gradient surrogate, the global mean over images (the same on every rank)
    loss: Tensor
    #: ``[N]`` new moving estimates u_i of each image's partition term (mean of its two anchors)
    partition: Tensor
    #: ``[N]`` stochastic gradient of the objective with respect to each image's tau_i, clipped
    tau_grad: Tensor


def isogclr(
    z1: Tensor,
    z2: Tensor,
    tau: Tensor,
    partition: Tensor,
    gamma: float = 0.8,
    rho: float = 0.4,
    tau_grad_clip: float = 3.0,
) -> ISogCLRStep:
    """iSogCLR's robust global contrastive loss (RGCL, Qiu et al. 2023, eq. 6 and Algorithm 1).

    With unit embeddings and s(a, b) their cosine similarity, anchor a (either view of image i of the
    global batch of N' images, 2N' samples) has the negatives S_a: the 2N' - 2 samples that are not a
    or its positive p (the other view of image i). The objective per image is

        F_i(w, tau_i) = tau_i log( (1/|S_a|) sum_{k in S_a} exp((s(a, k) - s(a, p)) / tau_i) ) + tau_i rho

    Its partition term g_a = (1/|S_a|) sum_k exp(s(a, k) / tau_i) is tracked per image by the
    moving average u_i (SogCLR's estimator, which makes small batches unbiased):

        u_a = (1 - gamma) u_i + gamma g_a        (u_a = g_a on an image's first visit, u_i == 0)

    and the loss is the surrogate whose gradient is F's gradient with u in place of the partition
    (weights w_ak = exp(s(a, k) / tau_i) / u_a, detached):

        L = (1/N') sum_i sum_{a in {i's two anchors}} [ (1/|S_a|) sum_k w_ak s(a, k) - s(a, p) ]

    Its value is not F's, only its gradient is. The temperature's gradient (d F_i / d tau_i) is

        grad_tau_a = log u_a + rho - (1/|S_a|) sum_k w_ak s(a, k) / tau_i

    averaged over i's two anchors and clipped to [-tau_grad_clip, tau_grad_clip]; each image's new u
    is the mean of its two anchors' u_a. This is ``SogCLR_DRO_Loss`` of the authors' code
    (github.com/zhqiu/contrastive-learning-iSogCLR, unimodal_exps/losses.py) with the first visit
    taken as LibAUC's ``GCLoss_v1`` does (gamma = 1 while u_i is unset; see :class:`ISogCLR`).
    Defaults: gamma 0.8, rho 0.4, clip 3.0, the authors' unimodal script.

    Each rank scores its own 2N anchors against the 2N' gathered samples and the per-rank sums are
    all-reduced, so every rank returns the global loss; ``partition`` and ``tau_grad`` are for this
    rank's N images.

    Args:
        z1, z2: [N, D] projections of the two views, row i of one paired with row i of the other.
        tau: [N] temperature tau_i of each image (iSogCLR's per-image memory).
        partition: [N] the images' previous estimates u_i (0 for an image never seen).
        gamma: weight of the new batch estimate in the moving average, in (0, 1].
        rho: the DRO constraint's radius; larger rho favours larger temperatures.
        tau_grad_clip: bound on the temperature gradient's magnitude.

    Returns:
        :class:`ISogCLRStep`; the loss in the input dtype (float32 for lower precision), the new u
        and the temperature gradients detached.
    """
    check_paired_rows("isogclr", z1, z2)
    n_local = z1.shape[0]
    for name, value in (("tau", tau), ("partition", partition)):
        if value.shape != (n_local,):
            raise ValueError(f"isogclr expects {name} of shape [N] = ({n_local},), got {tuple(value.shape)}")
    if not 0 < gamma <= 1:
        raise ValueError(f"isogclr needs 0 < gamma <= 1, got {gamma}")

    dtype = torch.promote_types(z1.dtype, torch.float32)
    with torch.autocast(z1.device.type, enabled=False):
        u1 = F.normalize(z1.to(dtype), dim=1)
        u2 = F.normalize(z2.to(dtype), dim=1)
        pairs = gather(torch.stack([u1, u2], dim=1))  # global order: all first views, then all second
        n_global = pairs.shape[0]
        if n_global < 2:
            raise ValueError(
                "isogclr needs at least 2 images in the global batch: an anchor's negatives are the other "
                f"images' views, and a batch of {n_global} image has none."
            )
        keys = torch.cat([pairs[:, 0], pairs[:, 1]])
        num_negatives = 2 * n_global - 2

        shard_sizes = gather(torch.tensor([n_local], device=z1.device))
        first_row = shard_sizes[: rank()].sum() + torch.arange(n_local, device=z1.device)
        own_image = torch.cat([first_row, first_row])  # the anchors' image, for both views
        anchors = torch.cat([u1, u2])
        sims = anchors @ keys.T  # [2N, 2N']
        positives = (anchors * torch.cat([u2, u1])).sum(dim=1)

        # An anchor's negatives: every sample of another image (both views of its own are excluded).
        key_image = torch.arange(2 * n_global, device=z1.device) % n_global
        is_negative = key_image[None, :] != own_image[:, None]

        anchor_tau = torch.cat([tau, tau]).to(dtype)[:, None]
        scaled = (sims / anchor_tau).detach()
        exp_sims = torch.exp(scaled).masked_fill(~is_negative, 0.0)
        batch_partition = exp_sims.sum(dim=1) / num_negatives
        previous = torch.cat([partition, partition]).to(dtype)
        moving = torch.where(previous > 0, (1 - gamma) * previous + gamma * batch_partition, batch_partition)
        weights = exp_sims / moving[:, None]

        per_anchor = (weights * sims).sum(dim=1) / num_negatives - positives
        loss = all_reduce_sum(per_anchor.sum()) / n_global

        tau_grad = moving.log() + rho - (weights * scaled).sum(dim=1) / num_negatives
        tau_grad = tau_grad.view(2, n_local).mean(dim=0).clamp(-tau_grad_clip, tau_grad_clip)
        return ISogCLRStep(loss, moving.view(2, n_local).mean(dim=0).detach(), tau_grad.detach())


def isogclr_temperature_step(
    tau: Tensor,
    tau_momentum: Tensor,
    tau_grad: Tensor,
    eta: float = 0.03,
    beta: float = 0.5,
    tau_min: float = 0.05,
    tau_max: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """iSogCLR's temperature update (Algorithm 1): momentum SGD on each image's tau_i, projected.

        m_i <- (1 - beta) m_i + beta grad_tau_i
        tau_i <- clamp(tau_i - eta m_i, tau_min, tau_max)

    Defaults are the authors' unimodal script (eta 0.03 constant, beta_u 0.5) and loss class
    (tau in [0.05, 1.0]).

    Returns:
        ``(new_tau, new_momentum)``, both ``[N]``.
    """
    momentum = (1 - beta) * tau_momentum + beta * tau_grad
    return (tau - eta * momentum).clamp(tau_min, tau_max), momentum
