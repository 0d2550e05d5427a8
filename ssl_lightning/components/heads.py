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


class WeightNormLinear(nn.Linear):
    """A bias-free linear layer with weight normalisation (Salimans and Kingma 2016), DINO's last layer:
    ``x @ (g * v / ||v||)^T``, each output row of ``weight`` (the direction ``v``, the official
    ``weight_v``) scaled to the length ``gain`` (``g``, the official ``weight_g``), which starts at 1.
    ``weight`` starts from ``nn.Linear``'s initialisation.

    ``fixed_gain=True`` (DINO's ``norm_last_layer``) freezes the gain at 1 as a buffer, so every output
    is a cosine similarity with a unit row; False makes it a trainable parameter.

    The normalisation is written out rather than ``torch.nn.utils.parametrizations.weight_norm``: the
    parameters stay plain tensors, so the layer deep-copies into an EMA teacher, compiles, and shards
    under FSDP (``use_orig_params``) with no frozen parameter in a unit, and its checkpoints load with
    ``weights_only=True``. A class of its own, so FSDP makes it a unit of its own: while DINO drops its
    gradients (the first epoch) the optimizer holds no state for any parameter of that unit, which
    FSDP's optimizer state dict requires of a unit (it refuses a unit whose parameters have state
    for some and not others).
    """

    def __init__(self, in_dim: int, out_dim: int, fixed_gain: bool = True):
        super().__init__(in_dim, out_dim, bias=False)
        gain = torch.ones(out_dim, 1)
        if fixed_gain:
            self.register_buffer("gain", gain)
        else:
            self.gain = nn.Parameter(gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.gain * F.normalize(self.weight, dim=1))


class DINOHead(nn.Module):
    """DINO's projection head (Caron et al. 2021; facebookresearch/dino ``vision_transformer.DINOHead``):
    an MLP with GELU (``num_layers`` linear layers, ``hidden_dim`` wide, optional BatchNorm), an
    L2-normalised ``bottleneck_dim`` output, and a weight-normalised bias-free last layer to ``out_dim``
    logits. Defaults: 3 layers, 2048 hidden, bottleneck 256, 65,536 outputs, no BatchNorm; the MLP's
    weights start from a truncated normal (std 0.02) with zero biases, the last layer from
    ``nn.Linear``'s initialisation.

    The last layer is a :class:`WeightNormLinear`; ``norm_last_layer=True`` (the official default)
    freezes its gain at 1, False trains it (DINO's recommendation for ViT-S, "better performance but
    can make the training unstable").
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        num_layers: int = 3,
        use_bn: bool = False,
        norm_last_layer: bool = True,
    ):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"A DINO head needs at least one layer; got num_layers={num_layers}.")
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_layers - 1):
            layers.append(nn.Linear(dim, hidden_dim))
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            dim = hidden_dim
        layers.append(nn.Linear(dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, fixed_gain=norm_last_layer)

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """``[N, out_dim]`` logits, or with ``pre_logits`` the L2-normalised bottleneck ``[N, bottleneck_dim]``
        (timm's name; the embedding the monitors read). A flag of ``forward`` rather than a method of its
        own: FSDP gathers a unit's parameters for its ``forward`` only."""
        bottleneck = F.normalize(self.mlp(x), dim=-1)
        return bottleneck if pre_logits else self.last_layer(bottleneck)
