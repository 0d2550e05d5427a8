"""EATA (Niu et al., "Efficient Test-Time Model Adaptation without Forgetting", ICML 2022) and its
variant without the regulariser, ETA (``fisher_alpha=0``)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_lightning.losses.eata import (
    eata_entropy_loss,
    fisher_penalty,
    non_redundant_samples,
    reliable_samples,
    update_average_probs,
)
from ssl_lightning.losses.entropy import softmax_entropy
from ssl_lightning.methods.tta.base import TTAMethod
from ssl_lightning.methods.tta.params import adapt_normalisation_affine

#: the seed of the source images the Fisher information is estimated on (the same on every process)
FISHER_SEED = 0


class EATA(TTAMethod):
    """Tent made selective and anchored (mr-eggplant/EATA; the benchmark's
    ``classification/methods/eata.py``). BatchNorm normalises with the test batch's statistics and
    the normalisation layers' affine parameters are adapted, as in Tent, by minimising the entropy of
    the predictions on the samples that pass two filters:

    * reliable: entropy ``E < E_0 = margin_e0 * ln C`` (Eq. 3);
    * non-redundant: ``|cos(m, p)| < d_margin`` for ``m`` a moving average (0.9) of the probabilities of
      earlier selected samples (Eq. 4, 5; ``m`` is the buffer ``average_probs``, restored by a reset;
      the first batch after one has no filter);

    each weighted by ``1 / exp(E - E_0)`` (Eq. 6, a constant of the step), plus the anti-forgetting
    regulariser ``fisher_alpha * sum F (theta - theta0)^2`` (Eq. 8, 9). ``F`` is the diagonal Fisher
    information of the adapted parameters, estimated once at test start as in the benchmark: the mean,
    over batches of ``num_samples`` clean source *training* images, of the squared gradient of the
    cross-entropy with the model's own predictions as labels (BatchNorm on those batches' statistics).
    ``fisher_alpha=0`` is ETA: no regulariser and no source images. A batch where no sample passes
    both filters takes no step (the benchmark's ``perform_update``); that decision reads one number on
    the host per batch.

    Defaults are the benchmark's CIFAR-10-C ones (``cfgs/cifar10_c/eata.yaml``): Adam, LR 1e-3, betas
    (0.9, 0.999), no weight decay, ``d_margin`` 0.4, ``fisher_alpha`` 1, 2,000 source images in batches
    of the stream's batch size (200), ``margin_e0`` 0.4 (``conf.py``). ImageNet-C uses ``d_margin`` 0.05
    and ``fisher_alpha`` 2000 (the paper's, ``conf.py``'s defaults).

    Several processes: each filters its own share of the batch with the shared ``m``; the loss is the
    mean over every process's selected samples, ``m`` is updated with their mean probability, and the
    step is skipped only when no process selected anything, so all processes keep one model and one
    ``m``. The Fisher information is computed by every process on the same source images.

    Args:
        margin_e0: E_0 as a fraction of ln C (0 < margin_e0 <= 1).
        d_margin: the cosine threshold of the redundancy filter (0 < d_margin <= 1).
        fisher_alpha: weight of the Fisher regulariser (>= 0; 0 is ETA).
        num_samples: source training images for the Fisher information (None: all of them).
        fisher_batch_size: their batch size (None: the stream's, as the benchmark's ``TEST.BATCH_SIZE``).
        **kwargs: the source model, optimizer and data arguments of :class:`TTAMethod`.
    """

    def __init__(
        self,
        margin_e0: float = 0.4,
        d_margin: float = 0.4,
        fisher_alpha: float = 1.0,
        num_samples: int | None = 2000,
        fisher_batch_size: int | None = None,
        **kwargs,
    ):
        name = type(self).__name__
        if not 0 < margin_e0 <= 1:
            raise ValueError(f"{name}: margin_e0 is E_0 as a fraction of ln C, in (0, 1] (paper 0.4), got {margin_e0}")
        if not 0 < d_margin <= 1:
            raise ValueError(f"{name}: d_margin is a cosine-similarity threshold in (0, 1] (CIFAR 0.4, ImageNet 0.05), "
                             f"got {d_margin}")
        if fisher_alpha < 0:
            raise ValueError(f"{name}: fisher_alpha must be >= 0 (0 turns the regulariser off: ETA), got {fisher_alpha}")
        if num_samples is not None and num_samples < 1:
            raise ValueError(f"{name}: num_samples must be >= 1 source images, or None for all, got {num_samples}")
        if fisher_batch_size is not None and fisher_batch_size < 1:
            raise ValueError(f"{name}: fisher_batch_size must be >= 1, or None for the stream's, got {fisher_batch_size}")
        super().__init__(**kwargs)
        self.margin = 0.0
        # the Fisher information and the source values of the adapted parameters: constants of the run
        self.fisher: list[Tensor] | None = None
        self.anchors: list[Tensor] | None = None

    def configure_adaptation(self) -> list[nn.Parameter]:
        adapted = adapt_normalisation_affine(self)
        classes = self.class_count()
        self.margin = self.hparams.margin_e0 * math.log(classes)
        self.register_buffer("average_probs", torch.zeros(classes))
        self.register_buffer("has_average_probs", torch.tensor(False))
        return adapted

    def on_test_start(self) -> None:
        super().on_test_start()  # checks the mode, builds the optimizer, snapshots the source state
        if self.fisher is None and self.hparams.fisher_alpha > 0:
            self.fisher, self.anchors = self.estimate_fisher()

    def estimate_fisher(self) -> tuple[list[Tensor], list[Tensor]]:
        """The benchmark's diagonal Fisher information of the adapted parameters: the squared gradient of
        the pseudo-label cross-entropy (mean over a batch) summed over the source batches and divided by
        their number; and the parameters' source values."""
        hp = self.hparams
        batch_size = hp.fisher_batch_size or hp.batch_size or getattr(self.trainer.datamodule, "batch_size", None) or 200
        sums = [torch.zeros_like(p, dtype=torch.float32) for p in self.adapted]
        batches = 0
        with torch.enable_grad():  # the test loop runs without gradients
            for batch in self.source_batches(hp.num_samples, batch_size, seed=FISHER_SEED):
                logits = self.model(batch["views"][0]).float()
                loss = F.cross_entropy(logits, logits.argmax(dim=1))
                grads = torch.autograd.grad(loss, self.adapted, allow_unused=True)
                for total, grad in zip(sums, grads):
                    if grad is not None:
                        total.add_(grad.float().square())
                batches += 1
        if not batches:
            raise ValueError(f"{type(self).__name__}: the source data ({self.source.describe()}) has no training image "
                             "to estimate the Fisher information on: set fisher_alpha=0 (ETA).")
        return [total / batches for total in sums], [p.detach().float().clone() for p in self.adapted]

    def forward_and_adapt(self, images: Tensor) -> Tensor:
        hp = self.hparams
        logits = self.model(images)
        entropy = softmax_entropy(logits)
        probs = torch.softmax(logits.detach().float(), dim=1)
        selected = reliable_samples(entropy, self.margin) & non_redundant_samples(
            probs, self.average_probs, self.has_average_probs, hp.d_margin)
        loss, count = eata_entropy_loss(entropy, selected, self.margin)
        if self.fisher is not None:
            loss = loss + fisher_penalty(self.adapted, self.fisher, self.anchors, hp.fisher_alpha)
        average, has_average = update_average_probs(self.average_probs, self.has_average_probs, probs, selected)
        if count > 0:  # a host read: no step when no sample of any process passed the filters
            # the loss is already the global batch's mean (each process holds its share times the process
            # count: ssl_lightning.distributed), so equal weights give the whole batch's gradient
            self.adapt_step(loss, 1)
        self.average_probs.copy_(average)
        self.has_average_probs.copy_(has_average)
        return logits
