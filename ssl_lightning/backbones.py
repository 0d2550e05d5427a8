"""Backbones from a timm name, a torchvision ResNet name, or any ``nn.Module``.

A backbone maps ``[B, C, H, W]`` images to ``[B, D]`` features (no classifier head).
"""

from __future__ import annotations

from typing import Any

import timm
import torch
import torchvision
from torch import nn

TORCHVISION_PREFIX = "torchvision."


def build_backbone(
    name: str = "resnet18",
    *,
    cifar_stem: bool = False,
    in_chans: int = 3,
    pretrained: bool = False,
    kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Build a feature extractor.

    Args:
        name: a timm model name (``resnet18``, ``vit_small_patch16_224``, ...) or
            ``torchvision.<resnet name>`` for torchvision's ResNets.
        cifar_stem: replace the ResNet stem (7x7 stride-2 conv + max-pool) by a 3x3 stride-1 conv
            and no pooling, the usual choice for 32x32 images (SimCLR appendix B.9).
        in_chans: input channels (1 for grayscale data).
        pretrained: load the library's pretrained weights (needs internet the first time).
        kwargs: extra builder arguments, e.g. ``{"layers": [1, 1, 1, 1], "channels": [32, 64, 128, 256]}``
            for a small timm ResNet.
    """
    kwargs = dict(kwargs or {})
    if name.startswith(TORCHVISION_PREFIX):
        model = _torchvision_resnet(name[len(TORCHVISION_PREFIX):], in_chans, pretrained, kwargs)
    else:
        if not timm.is_model(name):
            raise ValueError(
                f"Unknown backbone {name!r}: not a timm model name. Use a name from "
                "`timm.list_models()` or 'torchvision.<resnet name>' (e.g. 'torchvision.resnet50')."
            )
        model = timm.create_model(name, pretrained=pretrained, num_classes=0, in_chans=in_chans, **kwargs)
    if cifar_stem:
        _use_cifar_stem(model, name)
    return model


def _torchvision_resnet(name: str, in_chans: int, pretrained: bool, kwargs: dict) -> nn.Module:
    if not name.startswith(("resnet", "wide_resnet", "resnext")):
        raise ValueError(f"Only torchvision ResNets are supported by name; got 'torchvision.{name}'.")
    builder = getattr(torchvision.models, name, None)
    if builder is None:
        raise ValueError(f"torchvision has no model named {name!r}.")
    model = builder(weights="DEFAULT" if pretrained else None, **kwargs)
    model.num_features = model.fc.in_features
    model.fc = nn.Identity()
    if in_chans != 3:
        old = model.conv1
        model.conv1 = nn.Conv2d(in_chans, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False)
    return model


def _use_cifar_stem(model: nn.Module, name: str) -> None:
    conv1 = getattr(model, "conv1", None)
    if not isinstance(conv1, nn.Conv2d) or not hasattr(model, "maxpool"):
        raise ValueError(
            f"cifar_stem=True needs a ResNet with a single-conv stem (`conv1` + `maxpool`); {name!r} has none. "
            "Use a plain ResNet name (e.g. 'resnet18') or cifar_stem=False."
        )
    model.conv1 = nn.Conv2d(conv1.in_channels, conv1.out_channels, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()


@torch.no_grad()
def feature_dim(backbone: nn.Module, in_chans: int = 3, image_size: int = 32) -> int:
    """Dimension D of the backbone's features: ``num_features`` when the model declares it,
    else measured by one forward pass on a dummy batch."""
    declared = getattr(backbone, "num_features", None)
    if isinstance(declared, int):
        return declared
    was_training = backbone.training
    backbone.eval()
    try:
        out = backbone(torch.zeros(2, in_chans, image_size, image_size))
    finally:
        backbone.train(was_training)
    if out.ndim != 2:
        raise ValueError(
            f"The backbone must return [batch, features]; it returned shape {tuple(out.shape)}. "
            "Remove the classifier head and add pooling/flatten (e.g. nn.Sequential(model, nn.Flatten()))."
        )
    return out.shape[1]


def enable_grad_checkpointing(backbone: nn.Module) -> None:
    """Recompute the backbone's activations in the backward pass instead of keeping them: less
    memory for a larger batch or model, at the cost of a second forward (timm's
    ``set_grad_checkpointing``, which checkpoints each block).

    Refused for backbones with BatchNorm: the recomputed forward updates BatchNorm's running
    statistics a second time, so the evaluation-mode features (kNN, probes, export) would drift
    from what training saw. Transformers (LayerNorm) are what it is for.
    """
    name = type(backbone).__name__
    if not hasattr(backbone, "set_grad_checkpointing"):
        raise ValueError(
            f"grad_checkpointing: the backbone {name} has no set_grad_checkpointing(); timm models have it "
            "(ViTs, ConvNeXts, ...). Set grad_checkpointing to false."
        )
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in backbone.modules()):
        raise ValueError(
            f"grad_checkpointing: the backbone {name} has BatchNorm layers, whose running statistics the "
            "recomputed forward would update twice per step. Use it with LayerNorm backbones (ViTs), or "
            "set grad_checkpointing to false."
        )
    backbone.set_grad_checkpointing(True)
