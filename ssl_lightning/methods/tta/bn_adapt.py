"""BN-adapt: the source model with BatchNorm normalising by the test batch's statistics."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ssl_lightning.methods.tta.base import TTAMethod
from ssl_lightning.methods.tta.params import use_test_batch_statistics


class BNAdapt(TTAMethod):
    """Test-time normalisation (Schneider et al., "Improving robustness against common corruptions by
    covariate shift adaptation", NeurIPS 2020; Nado et al. 2020): every BatchNorm layer normalises with
    the mean and variance of the current test batch instead of its training statistics; no parameter
    changes (the benchmark's ``norm_test``, ``classification/methods/norm.py``). A model without
    BatchNorm is refused: BN-adapt would be the source model."""

    def configure_adaptation(self) -> list[nn.Parameter]:
        self.model.requires_grad_(False)
        if not use_test_batch_statistics(self.model):
            raise ValueError(
                f"{type(self).__name__}: the source model ({self.source.describe()}) has no BatchNorm layer, so there "
                "are no statistics to adapt: use Source for this model, or Tent (it adapts LayerNorm and GroupNorm)."
            )
        return []

    @torch.no_grad()
    def forward_and_adapt(self, images: Tensor) -> Tensor:
        return self.model(images)
