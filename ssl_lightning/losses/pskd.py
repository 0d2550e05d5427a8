"""Progressive self-knowledge distillation, PS-KD (Kim, Ji, Yoon and Hwang, ICCV 2021, "Self-Knowledge
Distillation with Progressive Refinement of Targets"): soft targets mixing the label with the model's
own prediction of the same image from the previous epoch."""

from __future__ import annotations

import torch
from torch import Tensor

from ssl_lightning.losses.soft_cross_entropy import soft_cross_entropy


def pskd_alpha(epoch: int, total_epochs: int, alpha_T: float = 0.8) -> float:
    """The weight of the past prediction at epoch ``epoch`` (0-based) of ``total_epochs``:

        a_t = alpha_T * (t + 1) / T

    as the official code computes it (lgcnsai/PS-KD-Pytorch, ``main.py``:
    ``alpha_T * ((epoch + 1) / end_epoch)``), rising linearly to alpha_T in the last epoch.
    """
    if total_epochs < 1:
        raise ValueError(f"pskd_alpha needs total_epochs >= 1 (the run's epochs, T), got {total_epochs}")
    if epoch < 0:
        raise ValueError(f"pskd_alpha needs a 0-based epoch >= 0, got {epoch}")
    if not 0.0 <= alpha_T <= 1.0:
        raise ValueError(f"pskd_alpha needs alpha_T in [0, 1] (the paper's 0.8), got {alpha_T}")
    return alpha_T * (epoch + 1) / total_epochs


def pskd_targets(labels: Tensor, previous: Tensor, alpha: float) -> Tensor:
    """PS-KD's soft targets, ``[N, C]``:

        targets_i = (1 - a) onehot(y_i) + a p_{t-1}(x_i)

    with ``previous`` the past predictions p_{t-1} (rows of probabilities) and ``a`` = a_t
    (:func:`pskd_alpha`). A row labelled -1 (unlabelled) has no label to mix in: its target row is all
    zeros, and :func:`pskd_loss` gives it weight 0. The one-hot is a scatter, not ``one_hot`` (which
    checks the label range on the host, a sync on the GPU). No gradient flows into ``previous``.

    Args:
        labels: [N] class indices, -1 where unlabelled.
        previous: [N, C] past predictions (probabilities).
        alpha: a in [0, 1].

    Returns:
        [N, C] targets in float32 or ``previous``'s wider dtype.
    """
    if previous.dim() != 2 or labels.shape != previous.shape[:1] or labels.is_floating_point():
        raise ValueError(
            f"pskd_targets expects integer labels [N] and previous predictions [N, C], got labels {labels.dtype} "
            f"of shape {tuple(labels.shape)} and previous of shape {tuple(previous.shape)}"
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"pskd_targets needs alpha in [0, 1] (a_t = alpha_T (t + 1) / T), got {alpha}")
    dtype = torch.promote_types(previous.dtype, torch.float32)
    labelled = (labels >= 0).to(dtype).unsqueeze(1)
    onehot = torch.zeros(previous.shape, dtype=dtype, device=previous.device)
    onehot.scatter_(1, labels.clamp(min=0).long().unsqueeze(1), 1.0)
    return labelled * ((1.0 - alpha) * onehot + alpha * previous.detach().to(dtype))


def pskd_loss(logits: Tensor, labels: Tensor, previous: Tensor, alpha: float) -> Tensor:
    """Cross-entropy of ``logits`` against PS-KD's targets (:func:`pskd_targets`), averaged over the
    labelled rows of the global batch:

        L = - 1/|labelled| sum_{i labelled} sum_c targets_ic log softmax(logits_i)_c

    The official ``Custom_CrossEntropy_PSKD`` (lgcnsai/PS-KD-Pytorch, ``loss/pskd_loss.py``:
    ``(-targets * log_softmax(output)).mean(0).sum()``), with unlabelled rows (-1) weighted 0 rather
    than selected away (no host sync). ``losses.soft_cross_entropy`` computes it in float32 with
    autocast off and all-reduces the sum and the count (``ssl_lightning.distributed``'s convention).
    With ``alpha`` 0, or ``previous`` the one-hot labels, this is the plain cross-entropy.

    Args:
        logits: [N, C] class scores.
        labels: [N] class indices, -1 where unlabelled.
        previous: [N, C] past predictions p_{t-1} (no gradient flows into them).
        alpha: a_t in [0, 1].
    """
    if logits.shape != previous.shape:
        raise ValueError(
            f"pskd_loss expects logits and previous predictions of the same shape [N, C], got "
            f"{tuple(logits.shape)} and {tuple(previous.shape)}"
        )
    targets = pskd_targets(labels, previous, alpha)
    return soft_cross_entropy(logits, targets, (labels >= 0).to(targets.dtype))
