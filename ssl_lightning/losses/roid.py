"""ROID's losses, sample weights and prior correction (Marsden, Döbler, Yang, "Universal Test-time
Adaptation through Weight Ensembling, Diversity Weighting, and Prior Correction", WACV 2024).

Formulas and constants from the mariodoebler/test-time-adaptation benchmark: ``SoftLikelihoodRatio``
and ``SymmetricCrossEntropy`` in ``classification/utils/losses.py``; the weights, the moving average
of the class probabilities and the prior correction in ``classification/methods/roid.py``.

Everything that depends on the whole batch (the weights' min-max normalisation and mean threshold,
the batch's class prior) is computed over the global batch: under DDP one small all-reduce makes
every process see the statistics of the concatenation of all processes' images, as the benchmark on
one device. None of these carries a gradient (the benchmark computes them under ``no_grad``), and
none reads a value on the host.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from ssl_lightning.distributed import all_reduce_sum, world_size


def _check_logits(name: str, logits: Tensor) -> None:
    if logits.dim() != 2 or logits.shape[0] < 1 or logits.shape[1] < 2:
        raise ValueError(f"{name} expects logits of shape [N, C] with N >= 1 images and C >= 2 classes, "
                         f"got {tuple(logits.shape)}")


def _dtype(tensor: Tensor) -> torch.dtype:
    return torch.promote_types(tensor.dtype, torch.float32)  # half precision in, float32 inside


def soft_likelihood_ratio(logits: Tensor, clip: float = 0.99, eps: float = 1e-5) -> Tensor:
    """Per-image soft likelihood ratio loss, ``[N, C] -> [N]``:

        ``SLR(x) = -sum_c p_c log(p_c / (1 - p_c) + eps)``,  ``p = min(softmax(logits), clip)``.

    Unlike entropy its gradient does not vanish for confident predictions; the clip keeps
    ``1 - p_c`` away from 0, and a clipped probability passes no gradient (the benchmark's
    ``torch.clamp``). Float32 inside (float64 stays float64), autocast off.
    """
    _check_logits("soft_likelihood_ratio", logits)
    if not 0 < clip < 1 or eps <= 0:
        raise ValueError(f"soft_likelihood_ratio needs 0 < clip < 1 and eps > 0, got clip={clip} and eps={eps}")
    with torch.autocast(logits.device.type, enabled=False):
        probs = torch.clamp(logits.to(_dtype(logits)).softmax(dim=1), min=0.0, max=clip)
        return -(probs * torch.log(probs / (1 - probs) + eps)).sum(dim=1)


def _global_min_max(values: Tensor) -> tuple[Tensor, Tensor]:
    """Per column of ``values`` [N, k], the minimum and maximum over all processes' rows."""
    extremes = torch.cat([values.amax(dim=0), -values.amin(dim=0)])
    if world_size() > 1:
        dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
    k = values.shape[1]
    return -extremes[k:], extremes[:k]


def _min_max_normalised(values: Tensor, low: Tensor, high: Tensor) -> Tensor:
    # All equal (a batch of one image): 0, where the benchmark's 0 / 0 would make every weight NaN.
    spread = high - low
    return torch.where(spread > 0, (values - low) / torch.where(spread > 0, spread, 1), 0)


@torch.no_grad()
def certainty_diversity_weights(logits: Tensor, class_probs_ema: Tensor,
                                temperature: float = 1 / 3) -> tuple[Tensor, Tensor]:
    """ROID's per-image loss weights and the images they keep, over the global batch (no gradient):

    - diversity ``d_i = 1 - cos(p_bar, p_i)``, ``p_i = softmax(logits_i)``, ``p_bar`` the moving average
      of the batches' mean class probabilities (``class_probs_ema``): images predicted unlike recent
      batches count more, which keeps the model from collapsing onto a few classes;
    - certainty ``c_i = -H(p_i)`` (negative entropy);
    - both min-max normalised to [0, 1] over the batch: ``d_i <- (d_i - min d) / (max d - min d)``;
    - ``w_i = exp(d_i c_i / temperature)``, and ``w_i = 0`` for the images with ``d_i < mean(d)`` (not kept).

    Returns ``(weights [N], keep [N] bool)``. Where all images of the batch have the same ``d`` (or
    ``c``), its normalised value is 0 (the benchmark divides 0 by 0). Float32 inside.
    """
    _check_logits("certainty_diversity_weights", logits)
    if class_probs_ema.shape != logits.shape[1:]:
        raise ValueError(f"certainty_diversity_weights expects class_probs_ema of shape [C] = "
                         f"{tuple(logits.shape[1:])}, got {tuple(class_probs_ema.shape)}")
    if temperature <= 0:
        raise ValueError(f"certainty_diversity_weights needs temperature > 0, got {temperature}")
    dtype = _dtype(logits)
    with torch.autocast(logits.device.type, enabled=False):
        logits = logits.detach().to(dtype)
        probs, log_p = logits.softmax(dim=1), logits.log_softmax(dim=1)
        diversity = 1 - F.cosine_similarity(class_probs_ema.to(dtype).unsqueeze(0), probs, dim=1)
        certainty = (probs * log_p).sum(dim=1)  # -H(p)
        raw = torch.stack([diversity, certainty], dim=1)
        low, high = _global_min_max(raw)
        normalised = _min_max_normalised(raw, low, high)
        diversity, certainty = normalised.unbind(dim=1)
        total, count = all_reduce_sum(torch.stack([diversity.sum(), diversity.new_tensor(len(diversity))]))
        keep = diversity >= total / count
        weights = torch.exp(diversity * certainty / temperature) * keep
    return weights, keep


@torch.no_grad()
def batch_class_prior(logits: Tensor) -> tuple[Tensor, Tensor]:
    """The batch's mean softmax prediction ``[C]`` over the global batch, and the global batch's
    image count (a 0-d tensor): the class prior that ROID's moving average follows and its prior
    correction uses. Float32 inside; no gradient."""
    _check_logits("batch_class_prior", logits)
    with torch.autocast(logits.device.type, enabled=False):
        probs = logits.detach().to(_dtype(logits)).softmax(dim=1)
        sums = all_reduce_sum(torch.cat([probs.sum(dim=0), probs.new_tensor([len(probs)])]))
    return sums[:-1] / sums[-1], sums[-1]


@torch.no_grad()
def class_probs_ema_update(class_probs_ema: Tensor, batch_prior: Tensor, momentum: float = 0.9) -> Tensor:
    """``momentum * class_probs_ema + (1 - momentum) * batch_prior`` (the benchmark's ``update_model_probs``)."""
    if class_probs_ema.shape != batch_prior.shape:
        raise ValueError(f"class_probs_ema_update expects two tensors of the same shape [C], got "
                         f"{tuple(class_probs_ema.shape)} and {tuple(batch_prior.shape)}")
    if not 0 <= momentum <= 1:
        raise ValueError(f"class_probs_ema_update needs 0 <= momentum <= 1, got {momentum}")
    return momentum * class_probs_ema + (1 - momentum) * batch_prior


@torch.no_grad()
def prior_correction(logits: Tensor, prior: Tensor | None = None, batch_size: Tensor | int | None = None) -> Tensor:
    """ROID's adaptive prior correction of the predictions, ``[N, C] -> [N, C]``:

        ``gamma = max(1 / B, 1 / C) / max_c prior_c``,  ``prior~ = (prior + gamma) / (1 + gamma C)``,
        returns ``logits * prior~`` (per class).

    ``prior`` is the batch's mean softmax prediction and ``B`` its size (both over the global batch
    when None: :func:`batch_class_prior`). The additive smoothing ``gamma`` pulls the estimated prior
    towards uniform, the more the smaller the batch and the flatter the prior; ``prior~`` sums to 1.
    As in the benchmark (``classification/methods/roid.py``) the smoothed prior multiplies the
    *logits* the prediction is taken from. Computed in the logits' dtype (float32 at least); no gradient.
    """
    _check_logits("prior_correction", logits)
    if prior is None:
        prior, batch_size = batch_class_prior(logits)
    elif batch_size is None:
        raise ValueError("prior_correction: give batch_size (the number of images the prior was estimated from) "
                         "with prior, or neither")
    if prior.shape != logits.shape[1:]:
        raise ValueError(f"prior_correction expects a prior of shape [C] = {tuple(logits.shape[1:])}, "
                         f"got {tuple(prior.shape)}")
    if isinstance(batch_size, int) and batch_size < 1:  # a tensor is not read: that would wait for the device
        raise ValueError(f"prior_correction needs batch_size >= 1, got {batch_size}")
    classes = logits.shape[1]
    dtype = _dtype(logits)
    with torch.autocast(logits.device.type, enabled=False):
        prior = prior.to(dtype)
        batch_size = torch.as_tensor(batch_size, dtype=dtype, device=prior.device)
        gamma = torch.clamp(1 / batch_size, min=1 / classes) / prior.max()
        smoothed = (prior + gamma) / (1 + gamma * classes)
        return logits.to(dtype) * smoothed
