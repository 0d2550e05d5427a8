"""CoTTA (Wang, Fink, Van Gool, Dai, "Continual Test-Time Domain Adaptation", CVPR 2022)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ssl_lightning.components.teacher import EMATeacher
from ssl_lightning.losses.tta_consistency import symmetric_cross_entropy
from ssl_lightning.methods.tta.augment import pixel_augment
from ssl_lightning.methods.tta.base import TTAMethod
from ssl_lightning.methods.tta.params import adapt_only, use_test_batch_statistics


class CoTTA(TTAMethod):
    """A mean teacher whose targets are augmentation-averaged when the source model is unsure, and a
    student that is stochastically restored to the source weights (qinenergy/cotta; the benchmark's
    ``classification/methods/cotta.py`` and ``cfgs/cifar10_c/cotta.yaml``). For each batch:

    1. the anchor (the source model, frozen) gives its mean max-softmax confidence on the batch; below
       ``anchor_threshold`` the teacher's logits are the mean over ``num_augmentations`` augmented
       copies of the batch (``augment.py``, one forward each, so BatchNorm sees each copy's own
       statistics), otherwise the teacher's logits on the batch itself;
    2. the student (every parameter of the source model) takes one step on the cross-entropy of its
       prediction to the teacher's softmax (``symmetric=True``: the symmetric form the benchmark uses
       for ImageNet);
    3. the teacher follows the student by EMA with the fixed ``teacher_momentum``
       (:class:`EMATeacher`: it also averages floating buffers, which the benchmark leaves alone; BN
       layers hold none after ``use_test_batch_statistics``);
    4. each element of every adapted parameter returns to its source value with probability
       ``restore_probability``.

    The prediction is the teacher's logits of step 1, augmentation-averaged when they were (the
    benchmark returns that ``outputs_ema``). BatchNorm normalises with the test batch in the student,
    teacher and anchor.

    The restore masks come from a generator on the model's device, seeded from the run seed
    (``torch.initial_seed()`` at setup) and re-seeded by a reset, so that every process draws the same
    masks; the augmentations draw from their own generator, seeded likewise
    (``augment.PixelAugment``). Under several processes the anchor's confidence is the mean over the
    whole batch (one all-reduce), as on one device. Reading it on the host (the benchmark's ``if``) costs one sync per batch, which saves the
    ``num_augmentations`` teacher passes on confident batches.

    Defaults: the benchmark's CIFAR-10-C ones (Adam, LR 1e-3, beta 0.9, momentum 0.999, restore 0.01,
    threshold 0.92, 32 augmentations).

    Args:
        teacher_momentum: the EMA momentum of the teacher (``M_TEACHER.MOMENTUM``).
        restore_probability: the probability of restoring each parameter element (``COTTA.RST``; 0: off).
        anchor_threshold: augment the teacher's input below this anchor confidence (``COTTA.AP``: 0.92
            on CIFAR-10-C, 0.72 on CIFAR-100-C, 0.1 on ImageNet-C).
        num_augmentations: augmented copies averaged (``TEST.N_AUGMENTATIONS``).
        symmetric: the symmetric cross-entropy (weights 0.5, 0.5) instead of the cross-entropy to the
            teacher; the benchmark picks it for ImageNet, not for CIFAR.
        **kwargs: the source model, optimizer and data arguments of :class:`TTAMethod`.
    """

    def __init__(
        self,
        teacher_momentum: float = 0.999,
        restore_probability: float = 0.01,
        anchor_threshold: float = 0.92,
        num_augmentations: int = 32,
        symmetric: bool = False,
        optimizer: Literal["adam", "sgd"] = "adam",
        lr: float = 1e-3,
        beta: float = 0.9,
        weight_decay: float = 0.0,
        **kwargs,
    ):
        name = type(self).__name__
        if not 0.0 <= teacher_momentum <= 1.0 or not 0.0 <= restore_probability <= 1.0:
            raise ValueError(f"{name}: teacher_momentum and restore_probability must lie in [0, 1], got "
                             f"{teacher_momentum} and {restore_probability}")
        if num_augmentations < 1:
            raise ValueError(f"{name}: num_augmentations must be >= 1, got {num_augmentations} (to never augment, "
                             "set anchor_threshold: 0)")
        super().__init__(optimizer=optimizer, lr=lr, beta=beta, weight_decay=weight_decay, **kwargs)
        self._restore_seed = 0
        self._restore_generator: torch.Generator | None = None

    def configure_adaptation(self) -> list[nn.Parameter]:
        use_test_batch_statistics(self.model)
        adapted = adapt_only(self.model, list(self.model.named_parameters()))  # the benchmark adapts everything
        momentum = self.hparams.teacher_momentum
        self.teacher = EMATeacher(self.model, base_momentum=momentum, final_momentum=momentum)
        self.anchor = EMATeacher(self.model, frozen=True)  # the source model, and the weights restored to
        self.augment = pixel_augment(self)
        self._restore_seed = torch.initial_seed()
        return adapted

    def forward_and_adapt(self, images: Tensor) -> Tensor:
        hp = self.hparams
        logits = self.model(images)
        with torch.no_grad():
            confidence = self.anchor(images).softmax(dim=1).amax(dim=1)
            if global_mean(confidence) < hp.anchor_threshold:  # the benchmark's threshold on the batch mean
                targets = torch.stack([self.teacher(self.augment(images)) for _ in range(hp.num_augmentations)]).mean(0)
            else:
                targets = self.teacher(images)
        loss = symmetric_cross_entropy(logits, targets, alpha=0.5 if hp.symmetric else 0.0).mean()
        self.adapt_step(loss, len(images))
        self.teacher.update(self.model, hp.teacher_momentum)
        if hp.restore_probability > 0:
            stochastic_restore_(self.adapted, list(self.anchor.module.parameters()), hp.restore_probability,
                                self._generator(images.device))
        return targets

    def on_reset(self) -> None:
        self._restore_generator = None  # the next batch re-seeds it: the masks of a fresh run

    def _generator(self, device: torch.device) -> torch.Generator:
        if self._restore_generator is None or self._restore_generator.device != device:
            self._restore_generator = torch.Generator(device=device).manual_seed(self._restore_seed)
        return self._restore_generator


@torch.no_grad()
def stochastic_restore_(parameters: list[Tensor], source: list[Tensor], probability: float,
                        generator: torch.Generator | None = None) -> None:
    """CoTTA's stochastic restore, in place: each element of each parameter independently takes its
    source value with ``probability`` (a Bernoulli mask per element from ``generator``, or torch's
    global one), exactly (a copy, not an interpolation)."""
    if len(parameters) != len(source):
        raise ValueError(f"stochastic_restore_: {len(parameters)} parameters but {len(source)} source tensors")
    for parameter, original in zip(parameters, source):
        mask = torch.rand(parameter.shape, device=parameter.device, generator=generator) < probability
        parameter.copy_(torch.where(mask, original, parameter))


def global_mean(values: Tensor) -> Tensor:
    """The mean of ``values`` over every process's rows (this process's mean in one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values.mean()
    total = torch.stack([values.sum(), torch.ones_like(values).sum()])
    dist.all_reduce(total)
    return total[0] / total[1]
