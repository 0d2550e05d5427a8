"""Source: the source model unchanged, the baseline of every test-time adaptation table."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ssl_lightning.methods.tta.base import TTAMethod


class Source(TTAMethod):
    """No adaptation: the source model in eval mode, BatchNorm with its training (running) statistics
    (the benchmark's ``source``). Its error is the corruption's damage that the other methods repair."""

    def configure_adaptation(self) -> list[nn.Parameter]:
        self.model.requires_grad_(False)
        return []

    @torch.no_grad()
    def forward_and_adapt(self, images: Tensor) -> Tensor:
        return self.model(images)
