"""Tent (Wang et al., "Tent: Fully Test-Time Adaptation by Entropy Minimization", ICLR 2021)."""

from __future__ import annotations

from torch import Tensor, nn

from ssl_lightning.losses.entropy import softmax_entropy
from ssl_lightning.methods.tta.base import TTAMethod
from ssl_lightning.methods.tta.params import adapt_normalisation_affine


class Tent(TTAMethod):
    """Entropy minimisation on the normalisation layers' affine parameters: BatchNorm normalises with
    the test batch's statistics, and one optimizer step per batch lowers the mean entropy of the
    softmax predictions, changing only the ``weight`` and ``bias`` of BatchNorm, LayerNorm and
    GroupNorm layers (DequanWang/tent; the benchmark's ``classification/methods/tent.py``). The
    prediction is the forward pass the loss is computed on, before the step.

    Defaults are the benchmark's CIFAR-10-C ones (``cfgs/cifar10_c/tent.yaml``): Adam, LR 1e-3, betas
    (0.9, 0.999), no weight decay, batch 200 (the DataModule's).

    Args:
        **kwargs: the source model, optimizer and data arguments of :class:`TTAMethod`.
    """

    def configure_adaptation(self) -> list[nn.Parameter]:
        return adapt_normalisation_affine(self)

    def forward_and_adapt(self, images: Tensor) -> Tensor:
        logits = self.model(images)
        self.adapt_step(softmax_entropy(logits).mean(), len(images))
        return logits
