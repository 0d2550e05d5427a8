"""ROID (Marsden, Döbler, Yang, "Universal Test-time Adaptation through Weight Ensembling, Diversity
Weighting, and Prior Correction", WACV 2024)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ssl_lightning.losses.roid import (
    batch_class_prior,
    certainty_diversity_weights,
    class_probs_ema_update,
    prior_correction,
    soft_likelihood_ratio,
)
from ssl_lightning.losses.tta_consistency import symmetric_cross_entropy
from ssl_lightning.methods.tta.augment import pixel_augment
from ssl_lightning.methods.tta.base import TTAMethod
from ssl_lightning.methods.tta.params import adapt_normalisation_affine


class ROID(TTAMethod):
    """Self-training on the normalisation layers' affine parameters that stays near the source model.
    Per test batch (the benchmark's ``classification/methods/roid.py``):

    1. the logits of the test images, with BatchNorm on the batch's statistics (the prediction);
    2. certainty and diversity weights (``losses.roid.certainty_diversity_weights``): images predicted
       unlike the moving average of recent batches' class probabilities (``class_probs_ema``, momentum
       ``momentum_probs``) and with low entropy weigh more; the less diverse half is left out;
    3. the loss: the weighted soft likelihood ratio (SLR) plus, with ``use_consistency``, the weighted
       symmetric cross-entropy between the kept images' logits and those of one random augmentation of
       them (``augment.tta_augment``: reflect padding, no blur or noise), both summed over the kept images and divided by the batch's image count
       (the benchmark divides by ``TEST.BATCH_SIZE``: the same but on a domain's short last batch, which
       CIFAR-10-C's 10,000 images per domain in batches of 200 never have);
    4. one optimizer step, then weight ensembling: every adapted parameter becomes
       ``momentum_src * theta + (1 - momentum_src) * theta_source`` (the benchmark's ``ema_update_model``);
    5. the returned prediction: the step-1 logits (from the parameters before this batch's update)
       multiplied per class by the smoothed class prior of the batch (``losses.roid.prior_correction``).

    Only the ``weight`` and ``bias`` of BatchNorm, LayerNorm and GroupNorm layers adapt; BatchNorm
    normalises with the test batch's statistics (the benchmark's ``collect_params``/``configure_model``).

    Defaults are the benchmark's for CIFAR-10-C: ``cfgs/cifar10_c/roid.yaml`` (Adam, LR 1e-3, betas
    (0.9, 0.999), no weight decay, batch 200, one step) and the ``ROID`` options of
    ``classification/conf.py`` (weighting, prior correction and consistency on, ``MOMENTUM_SRC`` 0.99,
    ``MOMENTUM_PROBS`` 0.9, ``TEMPERATURE`` 1/3). The SLR clip (0.99) and eps (1e-5) and the symmetric
    cross-entropy's alpha (0.5) are the benchmark's fixed constants (``classification/utils/losses.py``).

    The consistency pass takes only the kept images, as the benchmark, so that BatchNorm normalises
    them with their own statistics: choosing them reads the selection's size on the host, one sync per
    batch (like the family's reset flag). The augmentation works on pixels, so the test data must name
    its normalisation (``mean``, ``std``: our DataModules do). Its random parameters, one draw per batch
    as the benchmark's transforms on a batch tensor, come from the augmentation's own CPU generator,
    seeded with the run's seed, the same on every process (``augment.PixelAugment``): several processes
    adapt as one does. :meth:`reset` leaves it running (as the benchmark's global generator). Under several processes the weights' normalisation, the class prior
    and its moving average are over the global batch.

    Args:
        use_weighting: certainty and diversity weights (off: every image weighs 1 and
            ``class_probs_ema`` stays uniform).
        use_prior_correction: return prior-corrected logits (off: the plain logits).
        use_consistency: add the consistency loss on augmented images.
        momentum_src: weight ensembling's momentum (1: no ensembling).
        momentum_probs: momentum of the moving average of the batches' class probabilities.
        temperature: the temperature of the weights, ``exp(d c / temperature)``.
        **kwargs: the source model, optimizer and data arguments of :class:`TTAMethod`.
    """

    def __init__(
        self,
        use_weighting: bool = True,
        use_prior_correction: bool = True,
        use_consistency: bool = True,
        momentum_src: float = 0.99,
        momentum_probs: float = 0.9,
        temperature: float = 1 / 3,
        **kwargs,
    ):
        name = type(self).__name__
        for option, value in (("momentum_src", momentum_src), ("momentum_probs", momentum_probs)):
            if not 0 <= value <= 1:
                raise ValueError(f"{name}: {option} must be in [0, 1] (the weight of the running value), got {value}")
        if temperature <= 0:
            raise ValueError(f"{name}: temperature must be > 0, got {temperature}")
        super().__init__(**kwargs)

    def configure_adaptation(self) -> list[nn.Parameter]:
        adapted = adapt_normalisation_affine(self)
        # Constant: the source values the adapted parameters are averaged with, flat (buffers move with the module).
        self.register_buffer("source_parameters", torch.cat([p.detach().reshape(-1) for p in adapted]).clone(),
                             persistent=False)
        classes = self.class_count()
        # A buffer, so that reset() restores it with the state dict: the benchmark starts it uniform.
        self.register_buffer("class_probs_ema", torch.full((classes,), 1 / classes))
        if self.hparams.use_consistency:  # the benchmark's get_tta_transforms(padding_mode="reflect", cotta_augs=False)
            self.augment = pixel_augment(self, padding_mode="reflect", cotta_augs=False,
                                         otherwise=", or set use_consistency: false")
        return adapted

    def forward_and_adapt(self, images: Tensor) -> Tensor:
        hp = self.hparams
        logits = self.model(images)
        prior, count = batch_class_prior(logits)
        weights, keep = torch.ones(len(images), device=logits.device), None  # unweighted: every image, weight 1
        if hp.use_weighting:
            weights, keep = certainty_diversity_weights(logits, self.class_probs_ema, hp.temperature)
            self.class_probs_ema.copy_(class_probs_ema_update(self.class_probs_ema, prior, hp.momentum_probs))
        # Left-out images have weight 0: summing over all equals the benchmark's sum over the kept ones.
        loss = (soft_likelihood_ratio(logits) * weights).sum() / len(images)
        if hp.use_consistency:
            kept = None if keep is None else keep.nonzero().squeeze(1)  # a host sync: the pass is sized by it
            chosen, chosen_logits, chosen_weights = (
                (images, logits, weights) if kept is None else
                (images.index_select(0, kept), logits.index_select(0, kept), weights.index_select(0, kept)))
            augmented = self.model(self.augment(chosen))
            loss = loss + (symmetric_cross_entropy(augmented, chosen_logits) * chosen_weights).sum() / len(images)
        self.adapt_step(loss, len(images))
        self.ensemble_with_source()
        if hp.use_prior_correction:
            return prior_correction(logits.detach(), prior, count)
        return logits

    # ----------------------------------------------------------------- parts
    @torch.no_grad()
    def ensemble_with_source(self) -> None:
        """Weight ensembling: ``theta <- m * theta + (1 - m) * theta_source`` for every adapted parameter."""
        momentum = self.hparams.momentum_src
        if momentum >= 1:
            return
        sources = torch.split(self.source_parameters, [p.numel() for p in self.adapted])
        for parameter, source in zip(self.adapted, sources):
            parameter.copy_(momentum * parameter + (1 - momentum) * source.view_as(parameter))
