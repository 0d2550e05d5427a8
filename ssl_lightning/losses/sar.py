"""SAR's reliable entropy and model-recovery criterion (Niu et al., "Towards Stable Test-Time
Adaptation in Dynamic Wild World", ICLR 2023; mr-eggplant/SAR and the mariodoebler/test-time-adaptation
benchmark's ``classification/methods/sar.py``). The reliable-sample filter ``E_i < E_0`` is EATA's
(:func:`ssl_lightning.losses.eata.reliable_samples`)."""

from __future__ import annotations

import torch
from torch import Tensor

from ssl_lightning.losses.eata import selected_mean

#: the loss moving average's factor for the old value (the benchmark's ``update_ema``: 0.9)
LOSS_EMA_MOMENTUM = 0.9


def reliable_entropy_loss(entropy: Tensor, reliable: Tensor) -> tuple[Tensor, Tensor]:
    """SAR's reliable entropy (Eq. 2): the mean of the entropies of the ``reliable`` samples, over the
    global batch, and their number (detached). Nothing reliable gives 0 with zero gradients (the
    benchmark's nan mean backpropagates zero gradients too)."""
    return selected_mean(entropy, reliable)


def update_loss_ema(ema: Tensor, has_ema: Tensor, loss: Tensor, count: Tensor,
                    momentum: float = LOSS_EMA_MOMENTUM) -> tuple[Tensor, Tensor]:
    """SAR's moving average of the second-pass loss (the model-recovery criterion, Section 4.3): the
    first value replaces it, later ones give ``momentum * ema + (1 - momentum) * loss``, and a batch
    without reliable samples (``count`` 0: the benchmark's nan loss, which it skips) keeps it. Returns
    the new ``(ema, has_ema)``; the inputs are not changed."""
    if ema.dim() or has_ema.dim() or loss.dim() or count.dim():
        raise ValueError(
            f"update_loss_ema expects scalar tensors, got shapes {tuple(ema.shape)}, {tuple(has_ema.shape)}, "
            f"{tuple(loss.shape)} and {tuple(count.shape)}"
        )
    with torch.no_grad():
        value = loss.detach().to(ema.dtype)
        seen = count > 0
        updated = torch.where(has_ema, momentum * ema + (1 - momentum) * value, value)
        return torch.where(seen, updated, ema), has_ema | seen
