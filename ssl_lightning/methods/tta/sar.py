"""SAR (Niu et al., "Towards Stable Test-Time Adaptation in Dynamic Wild World", ICLR 2023)."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from ssl_lightning.losses.eata import reliable_samples
from ssl_lightning.losses.entropy import softmax_entropy
from ssl_lightning.losses.sar import reliable_entropy_loss, update_loss_ema
from ssl_lightning.methods.tta.base import TTAMethod
from ssl_lightning.methods.tta.params import NORMALISATION_LAYERS, adapt_only, use_test_batch_statistics
from ssl_lightning.methods.tta.sam import SAM

#: module names SAR leaves alone (the benchmark's ``collect_params``): ResNets' last stage, the last three
#: blocks of a 12-block ViT, and anything under a module called ``norm``
SKIPPED_NAME_PARTS = ("layer4", "blocks.9", "blocks.10", "blocks.11", "norm.")
#: the prefix of our checkpoints' backbone (``nn.Sequential(backbone=..., head=...)``)
BACKBONE_PREFIX = "backbone."


def sar_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of the affine ``weight`` and ``bias`` of the normalisation layers SAR adapts:
    Tent's, except in modules whose name contains ``layer4``, ``blocks.9``, ``blocks.10``, ``blocks.11`` or
    ``norm.``, and the final ``norm`` of a ViT (the benchmark's ``collect_params``, which names it
    ``norm`` on a bare timm model; here also ``backbone.norm``, its name in our checkpoints). Deep
    layers' norms make entropy minimisation collapse more easily (SAR, Section 5)."""
    selected = []
    for module_name, module in model.named_modules():
        bare = module_name.removeprefix(BACKBONE_PREFIX)
        if any(part in module_name for part in SKIPPED_NAME_PARTS) or bare == "norm":
            continue
        if isinstance(module, NORMALISATION_LAYERS):
            for name, parameter in module.named_parameters(recurse=False):
                if name in ("weight", "bias"):
                    selected.append((f"{module_name}.{name}" if module_name else name, parameter))
    return selected


class SAR(TTAMethod):
    """Sharpness-aware and reliable entropy minimisation with model recovery (mr-eggplant/SAR; the
    benchmark's ``classification/methods/sar.py``). BatchNorm normalises with the test batch's
    statistics; the affine parameters of the normalisation layers (:func:`sar_parameters`) are adapted
    by one SAM step per batch (:class:`~ssl_lightning.methods.tta.sam.SAM`):

    1. forward the batch; the loss is the mean entropy of the reliable samples, ``E < E_0 = margin_e0 *
       ln C`` (Eq. 2); backward, then move the parameters by ``rho * g / ||g||`` (Eq. 4);
    2. forward the whole batch again at the perturbed point; the loss is the mean entropy of the samples
       reliable in both passes; backward, return to the unperturbed parameters and step the base
       optimizer with these gradients (Eq. 5);
    3. model recovery: a moving average (0.9) of the second loss below ``reset_constant`` means the model
       has collapsed to confident trivial predictions, and the source state is restored (Section 4.3).
       The average is the buffer ``loss_ema`` (restored by every reset); the check reads one number on
       the host per batch.

    The prediction is the first forward pass, before the update. Defaults are the benchmark's for
    CIFAR-10-C (``cfgs/cifar10_c/sar.yaml``, ``conf.py``, ``setup_optimizer``): SGD with momentum 0.9
    (no Nesterov, no dampening, no weight decay) and LR 1e-3 inside SAM with rho 0.05, ``margin_e0`` 0.4,
    ``reset_constant`` 0.2. The benchmark uses LR 1e-3 for every ViT and Swin too.

    Several processes: each filters its own share of the batch; the losses are means over every
    process's reliable samples and the gradients are averaged after each backward pass, so the
    perturbation, the step, the moving average and the reset decision are the same on every process.

    Args:
        margin_e0: E_0 as a fraction of ln C (0 < margin_e0 <= 1).
        rho: SAM's neighbourhood radius (>= 0).
        reset_constant: the recovery threshold of the loss moving average (>= 0; 0 never resets).
        optimizer, lr, momentum, nesterov, weight_decay: SAM's base optimizer.
        **kwargs: the source model and data arguments of :class:`TTAMethod`.
    """

    def __init__(
        self,
        margin_e0: float = 0.4,
        rho: float = 0.05,
        reset_constant: float = 0.2,
        optimizer: Literal["adam", "sgd"] = "sgd",
        lr: float = 1e-3,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        **kwargs,
    ):
        name = type(self).__name__
        if not 0 < margin_e0 <= 1:
            raise ValueError(f"{name}: margin_e0 is E_0 as a fraction of ln C, in (0, 1] (paper 0.4), got {margin_e0}")
        if rho < 0:
            raise ValueError(f"{name}: rho is SAM's neighbourhood radius and must be >= 0 (paper 0.05), got {rho}")
        if reset_constant < 0:
            raise ValueError(f"{name}: reset_constant is an entropy threshold and must be >= 0 (paper 0.2; 0 never "
                             f"resets), got {reset_constant}")
        super().__init__(optimizer=optimizer, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                         **kwargs)
        self.margin = 0.0
        self.sam: SAM | None = None
        self.register_buffer("loss_ema", torch.tensor(0.0))
        self.register_buffer("has_loss_ema", torch.tensor(False))

    def configure_adaptation(self) -> list[nn.Parameter]:
        use_test_batch_statistics(self.model)
        parameters = sar_parameters(self.model)
        if not parameters:
            raise ValueError(
                f"{type(self).__name__}: the source model ({self.source.describe()}) has no normalisation layer with an "
                "affine weight and bias outside the layers SAR skips (layer4, blocks.9-11, the final norm), so SAR has "
                "nothing to adapt."
            )
        self.margin = self.hparams.margin_e0 * math.log(self.class_count())
        return adapt_only(self.model, parameters)

    def on_test_start(self) -> None:
        super().on_test_start()  # builds the base optimizer
        self.sam = SAM(self.adapted, self.tta_optimizer, self.hparams.rho)

    def forward_and_adapt(self, images: Tensor) -> Tensor:
        logits = self.model(images)
        entropy = softmax_entropy(logits)
        reliable = reliable_samples(entropy, self.margin)
        loss, _ = reliable_entropy_loss(entropy, reliable)
        loss.backward()
        # the losses are the global batch's means (ssl_lightning.distributed's convention), so the plain
        # mean over processes is the whole batch's gradient
        self.average_gradients(1)
        self.sam.first_step()

        entropy = softmax_entropy(self.model(images))
        reliable = reliable & reliable_samples(entropy, self.margin)
        loss, count = reliable_entropy_loss(entropy, reliable)
        loss.backward()
        self.average_gradients(1)
        self.sam.second_step()

        ema, has_ema = update_loss_ema(self.loss_ema, self.has_loss_ema, loss, count)
        self.loss_ema.copy_(ema)
        self.has_loss_ema.copy_(has_ema)
        if bool(has_ema & (ema < self.hparams.reset_constant)):  # a host read: the collapse check
            self.reset()
        return logits
