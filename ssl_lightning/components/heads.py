"""Heads: projectors, predictors and classifiers (every class here is an FSDP unit, see strategies.HEADS)."""

from __future__ import annotations

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
