"""Evaluations of a frozen pretrained backbone (linear probe, kNN), and encoding a loader with it."""

from __future__ import annotations

import torch
from torch import nn

from ssl_lightning.evaluation.pretrained import PretrainedBackboneModule


class FrozenBackboneModule(PretrainedBackboneModule):
    """Base of evaluations that read a method checkpoint's backbone and never train it.

    The backbone stays in eval mode (BatchNorm statistics frozen) even when Lightning switches the
    module to training mode, and has no trainable parameters. Arguments: see
    :class:`PretrainedBackboneModule`.
    """

    def configure_model(self) -> None:
        super().configure_model()
        self.backbone.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.backbone is not None:
            self.backbone.eval()
        return self


@torch.no_grad()
def encode_split(backbone: nn.Module, loader, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels of a whole loader, stored by dataset ``index`` (row i = image i)."""
    feats, labels, indices = [], [], []
    for batch in loader:
        feats.append(backbone(batch["views"][0].to(device)).float())
        labels.append(batch["label"].to(device))
        indices.append(batch["index"].to(device))
    index = torch.cat(indices)
    by_index = torch.empty(int(index.max()) + 1, feats[0].shape[1], device=device)
    labels_by_index = torch.full((by_index.shape[0],), -1, dtype=torch.long, device=device)
    by_index[index], labels_by_index[index] = torch.cat(feats), torch.cat(labels)
    return by_index, labels_by_index
