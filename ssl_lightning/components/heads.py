"""Heads: projectors, predictors and classifiers (every class here is an FSDP unit, see strategies.HEADS)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLPHead(nn.Sequential):
    """``num_layers`` linear layers; every hidden layer is Linear -> BatchNorm1d -> ReLU.

    This is the projector of SimCLR v2 / BYOL / Barlow Twins and BYOL's predictor; the papers
    differ only in widths, depth, biases and whether the output is batch-normalised.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int,
        out_dim: int,
        num_layers: int = 2,
        bias: bool = True,
        last_batch_norm: bool = False,
    ):
        if num_layers < 1:
            raise ValueError(f"An MLP head needs at least one layer; got num_layers={num_layers}.")
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_layers - 1):
            layers += [nn.Linear(dim, hidden_dim, bias=bias), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
            dim = hidden_dim
        layers.append(nn.Linear(dim, out_dim, bias=bias))
        if last_batch_norm:
            layers.append(nn.BatchNorm1d(out_dim, affine=False))
        super().__init__(*layers)


class LinearClassifier(nn.Linear):
    """The classification head of supervised and distillation methods: one linear layer from the
    backbone's features to class logits (timm's and torchvision's classifier). A head class, so FSDP
    wraps it as a unit of its own (``strategies.HEADS``)."""

    def __init__(self, in_dim: int, num_classes: int):
        super().__init__(in_dim, num_classes)


class Prototypes(nn.Linear):
    """SwAV's prototypes: K trainable unit vectors, scored against normalised projections by a
    bias-free linear layer (cosine similarities).

    The official code renormalises ``prototypes.weight`` in place, without gradient, before every
    forward pass, and the optimizer then steps the unit-norm weights: call :meth:`normalize_` at the
    start of each training step, not in ``forward`` (which may run more than once a step, and would
    change weights that autograd has saved). Under FSDP it needs the unit's full weights
    (``summon_full_params`` with write-back): a row's norm needs the whole row.
    """

    def __init__(self, in_dim: int, num_prototypes: int):
        super().__init__(in_dim, num_prototypes, bias=False)
        self.normalize_()

    @torch.no_grad()
    def normalize_(self) -> None:
        """Rescale every prototype (a row of the weight) to unit L2 norm, in place."""
        self.weight.copy_(F.normalize(self.weight, dim=1))
