"""EATA's sample selection, sample weights and anti-forgetting regulariser (Niu et al., "Efficient
Test-Time Model Adaptation without Forgetting", ICML 2022; mr-eggplant/EATA and the
mariodoebler/test-time-adaptation benchmark's ``classification/methods/eata.py``).

For a test batch with softmax predictions p_i and entropies E_i = H(p_i):

    reliable          E_i < E_0                          (Eq. 3; E_0 = 0.4 ln C)
    non-redundant     |cos(m, p_i)| < eps                (Eq. 5; m a moving average of selected p_i)
    weight            S_i = 1 / exp(E_i - E_0)           (Eq. 6; a constant: no gradient flows through it)
    loss              sum_{i selected} S_i E_i / #selected  +  beta sum_k F_k (theta_k - theta0_k)^2  (Eq. 8, 9)

The masks are boolean tensors (no selection by indexing): the method decides what to do with them.
The losses and the moving average take the *global* batch under DDP (``ssl_lightning.distributed``:
every rank returns the value of one process on the concatenated batch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_lightning.distributed import all_reduce_sum

#: the moving average's factor for the old value (the benchmark's ``update_model_probs``: 0.9)
PROBS_MOMENTUM = 0.9


def _check_entropy(name: str, entropy: Tensor, selected: Tensor | None = None) -> None:
    if entropy.dim() != 1:
        raise ValueError(f"{name} expects per-sample entropies of shape [N], got {tuple(entropy.shape)}")
    if selected is not None and (selected.shape != entropy.shape or selected.dtype != torch.bool):
        raise ValueError(
            f"{name} expects `selected` as a bool mask of shape {tuple(entropy.shape)} (one flag per sample), "
            f"got {selected.dtype} of shape {tuple(selected.shape)}"
        )


def reliable_samples(entropy: Tensor, margin: float) -> Tensor:
    """The reliable-sample filter of EATA (Eq. 3) and SAR (Eq. 2): ``E_i < margin`` (E_0 = 0.4 ln C in
    both papers), a bool mask ``[N]``. The entropy is read, never differentiated."""
    _check_entropy("reliable_samples", entropy)
    return entropy.detach() < margin


def non_redundant_samples(probs: Tensor, average_probs: Tensor, has_average: Tensor, d_margin: float) -> Tensor:
    """EATA's redundancy filter (Eq. 5): ``|cos(m, p_i)| < d_margin`` for the moving average ``m`` of the
    probabilities of earlier selected samples; every sample passes while there is no average yet
    (``has_average`` False: the first batch, or after a reset). A bool mask ``[N]``.

    Args:
        probs: ``[N, C]`` softmax probabilities of the batch.
        average_probs: ``[C]`` the moving average ``m``.
        has_average: a bool scalar tensor: whether ``m`` holds an average yet.
        d_margin: the cosine threshold epsilon (the benchmark's CIFAR-10-C ``D_MARGIN`` 0.4).
    """
    if probs.dim() != 2 or average_probs.shape != probs.shape[1:]:
        raise ValueError(
            f"non_redundant_samples expects probs [N, C] and average_probs [C], got {tuple(probs.shape)} and "
            f"{tuple(average_probs.shape)}"
        )
    with torch.autocast(probs.device.type, enabled=False):
        dtype = torch.promote_types(probs.dtype, torch.float32)
        cosine = F.cosine_similarity(average_probs.detach().to(dtype)[None], probs.detach().to(dtype), dim=1)
    return (cosine.abs() < d_margin) | ~has_average


def eata_sample_weights(entropy: Tensor, margin: float) -> Tensor:
    """EATA's sample weights ``S_i = 1 / exp(E_i - E_0)`` (Eq. 6), detached (the benchmark's
    ``coeff = 1 / exp(entropys.clone().detach() - e_margin)``): confident samples count more, and the
    weight is a constant of the step, not part of what is minimised."""
    _check_entropy("eata_sample_weights", entropy)
    with torch.autocast(entropy.device.type, enabled=False):
        detached = entropy.detach().to(torch.promote_types(entropy.dtype, torch.float32))
        return torch.exp(detached - margin).reciprocal()


def selected_mean(values: Tensor, selected: Tensor) -> tuple[Tensor, Tensor]:
    """``(sum of values[selected] / #selected, #selected)`` over the global batch: one all-reduce of the
    masked sum and the count. No sample selected gives ``(0, 0)`` with zero gradients (the benchmark's
    mean over an empty selection is nan, and it then skips the step or steps with zero gradients)."""
    _check_entropy("selected_mean", values, selected)
    with torch.autocast(values.device.type, enabled=False):
        values = values.to(torch.promote_types(values.dtype, torch.float32))
        # where, not multiply: a non-finite unselected value must not become nan
        total = torch.where(selected, values, torch.zeros_like(values)).sum()
        total, count = all_reduce_sum(torch.stack([total, selected.sum().to(values.dtype)]))
        return total / count.clamp(min=1), count.detach()


def eata_entropy_loss(entropy: Tensor, selected: Tensor, margin: float) -> tuple[Tensor, Tensor]:
    """EATA's weighted entropy ``sum_{i selected} S_i E_i / #selected`` (Eq. 8 without the regulariser)
    over the global batch, and the number of selected samples (detached).

    Args:
        entropy: ``[N]`` the entropies E_i (differentiable).
        selected: ``[N]`` bool, the samples that pass both filters.
        margin: E_0 of the weights.
    """
    _check_entropy("eata_entropy_loss", entropy, selected)
    weighted = eata_sample_weights(entropy, margin) * entropy
    return selected_mean(weighted, selected)


def update_average_probs(average_probs: Tensor, has_average: Tensor, probs: Tensor, selected: Tensor,
                         momentum: float = PROBS_MOMENTUM) -> tuple[Tensor, Tensor]:
    """EATA's moving average of the selected samples' probabilities (Eq. 4; the benchmark's
    ``update_model_probs``): ``m <- momentum m + (1 - momentum) mean_{i selected} p_i``; the first mean
    replaces ``m`` outright; a batch with nothing selected keeps it. Returns the new ``(m, has_average)``
    without changing the inputs; the mean is over the global batch (one all-reduce)."""
    if probs.dim() != 2 or average_probs.shape != probs.shape[1:] or selected.shape != probs.shape[:1]:
        raise ValueError(
            f"update_average_probs expects probs [N, C], average_probs [C] and selected [N], got "
            f"{tuple(probs.shape)}, {tuple(average_probs.shape)} and {tuple(selected.shape)}"
        )
    with torch.no_grad(), torch.autocast(probs.device.type, enabled=False):
        dtype = average_probs.dtype
        masked = torch.where(selected[:, None], probs.to(dtype), torch.zeros((), dtype=dtype, device=probs.device))
        sums = all_reduce_sum(torch.cat([masked.sum(dim=0), selected.sum().to(dtype)[None]]))
        count = sums[-1]
        mean = sums[:-1] / count.clamp(min=1)
        updated = torch.where(has_average, momentum * average_probs + (1 - momentum) * mean, mean)
        seen = count > 0
        return torch.where(seen, updated, average_probs), has_average | seen


def fisher_penalty(parameters: list[Tensor], fisher: list[Tensor], anchors: list[Tensor], alpha: float) -> Tensor:
    """EATA's anti-forgetting regulariser (Eq. 9): ``alpha * sum_k F_k (theta_k - theta0_k)^2`` summed over
    every element of every adapted parameter, with ``F`` the diagonal Fisher information estimated on
    source images and ``theta0`` the source values (the benchmark's ``ewc_loss``)."""
    if not (len(parameters) == len(fisher) == len(anchors)) or not parameters:
        raise ValueError(
            f"fisher_penalty expects one Fisher tensor and one anchor per parameter, got {len(parameters)} "
            f"parameters, {len(fisher)} Fisher tensors and {len(anchors)} anchors"
        )
    for parameter, f, anchor in zip(parameters, fisher, anchors):
        if parameter.shape != f.shape or parameter.shape != anchor.shape:
            raise ValueError(
                f"fisher_penalty: a parameter of shape {tuple(parameter.shape)} has a Fisher tensor of shape "
                f"{tuple(f.shape)} and an anchor of shape {tuple(anchor.shape)}; they must match"
            )
    device = parameters[0].device.type
    with torch.autocast(device, enabled=False):
        terms = [(f * (p.to(torch.promote_types(p.dtype, torch.float32)) - anchor) ** 2).sum()
                 for p, f, anchor in zip(parameters, fisher, anchors)]
        return alpha * torch.stack(terms).sum()
