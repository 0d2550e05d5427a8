"""Heads: projectors, predictors and classifiers (every class here is an FSDP unit, see strategies.HEADS)."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
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


def sincos_position_embedding(
    dim: int, grid_size: tuple[int, int], num_prefix_tokens: int = 0, device: torch.device | str | None = None
) -> torch.Tensor:
    """MAE's fixed 2-D sine-cosine position embedding (facebookresearch/mae ``util/pos_embed.py``,
    ``get_2d_sincos_pos_embed``, after MoCo v3), ``[num_prefix_tokens + h * w, dim]`` for an (h, w) grid of
    patches in row-major order, the prefix tokens' rows zero (the official class-token row).

    The first half of the dimensions encodes the patch's column, the second half its row (the official
    ``meshgrid(grid_w, grid_h)``); each half is ``[sin(pos * omega), cos(pos * omega)]`` with
    ``omega_k = 10000^(-k / (dim / 4))``, k = 0 .. dim/4 - 1. Computed in float64 on ``device`` (made
    there, so no copy from the host), returned in float32.
    """
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos position embedding needs a width divisible by 4, got {dim}")
    rows, columns = grid_size
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64, device=device) / (dim // 4))

    def one_axis(positions: torch.Tensor) -> torch.Tensor:
        angles = positions.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    row, column = torch.meshgrid(torch.arange(rows, dtype=torch.float64, device=device),
                                 torch.arange(columns, dtype=torch.float64, device=device), indexing="ij")
    grid = torch.cat([one_axis(column), one_axis(row)], dim=1)
    return torch.cat([grid.new_zeros(num_prefix_tokens, dim), grid]).float()


class MAEDecoder(nn.Module):
    """MAE's light decoder (He et al. 2022, sec. 3; facebookresearch/mae ``models_mae.py``,
    ``forward_decoder``): the encoder's tokens of the visible patches are projected to the decoder's
    width, a shared learned mask token fills every masked position, the tokens are put back in patch
    order, the fixed 2-D sin-cos position embedding (:func:`sincos_position_embedding`) is added, and
    ``depth`` transformer blocks (timm's ``Block``: qkv bias, LayerNorm eps 1e-6) and a norm lead to a
    linear prediction of each patch's p * p * C pixels. The encoder's prefix tokens (the class token,
    any register tokens) pass through the decoder too, with zero position embedding, and are dropped
    from the output. Defaults are the paper's: 8 blocks, width 512, 16 heads, MLP ratio 4.

    Initialisation as the official code: linear weights Xavier-uniform with zero biases, LayerNorms
    at (1, 0), the mask token normal with std 0.02. The position embedding is a non-persistent
    buffer: fixed, and determined by the grid, so checkpoints need not hold it. Images of another
    size (a ViT with ``dynamic_img_size``) get the exact embedding of their own grid, made on the device.

    Args:
        in_dim: the encoder's token width.
        patch_dim: values per patch to predict, p * p * C.
        grid_size: (rows, columns) of patches the encoder's images make.
        num_prefix_tokens: tokens before the patch tokens in the encoder's output (1: a class token).
        embed_dim, depth, num_heads, mlp_ratio: the decoder's width, blocks, heads and MLP ratio.
    """

    def __init__(
        self,
        in_dim: int,
        patch_dim: int,
        grid_size: tuple[int, int],
        num_prefix_tokens: int = 1,
        embed_dim: int = 512,
        depth: int = 8,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        if depth < 0 or num_heads < 1 or embed_dim % num_heads:
            raise ValueError(
                f"MAEDecoder needs depth >= 0 and a width divisible by the number of heads; got depth {depth}, "
                f"width {embed_dim}, {num_heads} heads"
            )
        self.num_prefix_tokens = num_prefix_tokens
        self.grid_size = tuple(grid_size)
        self.embed = nn.Linear(in_dim, embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer("pos_embed", sincos_position_embedding(embed_dim, grid_size, num_prefix_tokens)[None],
                             persistent=False)
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.Sequential(*(Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
                                      for _ in range(depth)))
        self.norm = norm_layer(embed_dim)
        self.pred = nn.Linear(embed_dim, patch_dim)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(
        self, tokens: torch.Tensor, ids_restore: torch.Tensor, grid_size: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """``[N, P + K, in_dim]`` encoder tokens (P prefix tokens, then the K visible patches in the
        encoder's order), ``[N, L]`` ``ids_restore`` (``components.masking.PatchMask``) and the images'
        (rows, columns) of patches (None: the grid it was built for) -> ``[N, L, patch_dim]``
        predictions for every patch, in patch order."""
        num_images, num_patches = ids_restore.shape
        grid_size = self.grid_size if grid_size is None else tuple(grid_size)
        if grid_size[0] * grid_size[1] != num_patches:
            raise ValueError(
                f"MAEDecoder: {num_patches} patches per image do not fill a {grid_size[0]}x{grid_size[1]} grid; "
                "pass the images' grid_size (rows, columns of patches)."
            )
        pos_embed = self.pos_embed
        if grid_size != self.grid_size:
            pos_embed = sincos_position_embedding(pos_embed.shape[-1], grid_size, self.num_prefix_tokens,
                                                  tokens.device)[None]
        x = self.embed(tokens)
        prefix, visible = x[:, : self.num_prefix_tokens], x[:, self.num_prefix_tokens:]
        masked = self.mask_token.expand(num_images, num_patches - visible.shape[1], -1)
        patches = torch.cat([visible, masked], dim=1)
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # patch order
        x = torch.cat([prefix, patches], dim=1) + pos_embed
        x = self.pred(self.norm(self.blocks(x)))
        return x[:, self.num_prefix_tokens:]
