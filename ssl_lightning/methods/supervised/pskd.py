"""PS-KD (Kim, Ji, Yoon and Hwang, ICCV 2021, "Self-Knowledge Distillation with Progressive Refinement of
Targets"): a classifier trained on its labels mixed with its own predictions from the previous epoch."""

from __future__ import annotations

import math
from typing import Any

import torch

from ssl_lightning.components.memory import IndexedMemory
from ssl_lightning.core.data_link import per_image_memory_size
from ssl_lightning.core.step_logging import logger_writes_this_step
from ssl_lightning.losses.pskd import pskd_alpha, pskd_loss
from ssl_lightning.methods.supervised.base import SupervisedMethod


class PSKD(SupervisedMethod):
    """Progressive self-knowledge distillation, teacher-free:

        loss = CE(softmax(s), (1 - a_t) onehot(y) + a_t p_{t-1}(x)),   a_t = alpha_T (t + 1) / T

    s the logits of the training view, p_{t-1}(x) the model's own softmax for the same image in the
    previous epoch, t the epoch (0-based), T the run's epochs (``losses.pskd``). The single term has
    weight 1. As the official code (lgcnsai/PS-KD-Pytorch, ``main.py`` and ``loss/pskd_loss.py``):

    - the stored prediction is the softmax of the training forward, on the augmented view, before
      the step's update; it is stored for every image of the step and used in the next epoch;
    - at epoch 0 there is no past prediction: the official code writes the one-hot label into its
      table before reading it, so epoch 0's targets are the one-hot labels (plain cross-entropy)
      whatever a_0 is. Here epoch 0 uses the one-hot labels directly;
    - T is ``trainer.max_epochs`` (the official ``end_epoch``), alpha_T 0.8.

    The table of past predictions is an :class:`IndexedMemory` (``predictions``, ``[images, classes]``
    float32, keyed by ``batch["index"]``, sized by the DataModule's ``num_train_images``). It is a
    buffer: checkpoints carry it, so a resume continues with the same table. Under DDP each step's
    rows are gathered from every rank before they are written (as the official code's all_gather),
    so every rank holds the whole table. A step reads its images' rows before it writes its own
    predictions, so the values it uses are the previous epoch's: each image is visited once per
    epoch. With ``drop_last`` (the DataModules' default) an image can miss an epoch; it then reads
    its latest stored prediction, or, never visited, its one-hot label (a row of zeros would not
    be a distribution). The table costs images x classes x 4 bytes on every device: 20 MB for
    CIFAR-100, 5 GB for ImageNet-1k (the official code keeps it in host memory).

    Unlabelled rows (label -1) have no one-hot part: the loss masks them (weight 0, no host sync);
    their predictions are still stored.

    The calibration the paper reports is logged by the base: ``val/ece`` and ``test/ece`` (15
    equal-width bins of the top-1 probability; the official ``utils/metric.py`` uses 10 bins and
    percent). ``train/alpha_t``, the weight the step gave the past prediction (0 in epoch 0), is
    logged on the logger's steps.

    A run must have a length in epochs: T is ``trainer.max_epochs``; a run bounded by ``max_steps``
    alone takes T as the number of epochs those steps span (the epoch the run stops in counts); a run
    with neither is refused.

    Args:
        alpha_T: a_t's value in the last epoch (the paper's 0.8), in [0, 1].
        num_train_images: rows of the prediction table; None takes the DataModule's. Saved in the
            hyperparameters, so ``load_from_checkpoint`` rebuilds a table of the saved size.
        **kwargs: backbone, data, optimizer and schedule arguments of :class:`SupervisedMethod`.
    """

    def __init__(self, alpha_T: float = 0.8, num_train_images: int | None = None, **kwargs: Any):
        if not 0.0 <= alpha_T <= 1.0:
            raise ValueError(f"PSKD: alpha_T must be in [0, 1] (the weight of the past prediction in the last "
                             f"epoch; the paper's 0.8), got {alpha_T}.")
        super().__init__(**kwargs)
        self.predictions: IndexedMemory | None = None

    def build_heads(self, feat_dim: int) -> None:
        super().build_heads(feat_dim)
        self.predictions = IndexedMemory(self._table_size(), shape=(self.hparams.num_classes,), fill=0.0)

    def _table_size(self) -> int:
        return per_image_memory_size(self, "each training image's last prediction")

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and not (_positive(self.trainer.max_epochs) or _positive(self.trainer.max_steps)):
            raise self._no_length(self.trainer)  # before the optimizer's schedule, which needs a length too

    def on_train_start(self) -> None:
        super().on_train_start()
        self.total_epochs(self.trainer)  # a length in steps that gives no epoch count stops now, not at epoch 1

    @classmethod
    def total_epochs(cls, trainer) -> int:
        """T: ``max_epochs``, or the epochs that ``max_steps`` spans when it alone bounds the run."""
        if _positive(trainer.max_epochs):
            return trainer.max_epochs
        batches = getattr(trainer, "num_training_batches", math.inf)
        if _positive(trainer.max_steps) and math.isfinite(batches) and batches > 0:
            steps_per_epoch = math.ceil(batches / trainer.accumulate_grad_batches)
            return math.ceil(trainer.max_steps / steps_per_epoch)
        raise cls._no_length(trainer)

    @staticmethod
    def _no_length(trainer) -> ValueError:
        return ValueError(
            f"PSKD: a_t = alpha_T (t + 1) / T needs the run's length T in epochs, but the Trainer has "
            f"max_epochs={trainer.max_epochs} and max_steps={trainer.max_steps}"
            f"{' over a loader of unknown length' if _positive(trainer.max_steps) else ''}. Set "
            "trainer.max_epochs (--trainer.max_epochs in the CLI; the paper trains 300)."
        )

    def shared_step(self, batch: dict) -> dict:
        if "index" not in batch:
            raise ValueError(
                "PSKD needs batch['index'], each image's position in the training set, to find its previous "
                "prediction: use an ssl_lightning DataModule, or a dataset whose items carry 'index'."
            )
        images, labels, index = batch["views"][0], batch["label"], batch["index"]
        epoch = self._trainer.current_epoch if self._trainer is not None else 0
        # Read before this step writes: the rows are the previous epoch's predictions.
        stored = self.predictions.read(index)
        onehot = torch.zeros_like(stored).scatter_(1, labels.clamp(min=0).long().unsqueeze(1), 1.0)
        if epoch == 0:  # no past prediction yet: the official code's one-hot targets
            alpha, previous = 0.0, onehot
        else:
            alpha = pskd_alpha(epoch, self.total_epochs(self._trainer), self.hparams.alpha_T)
            never_written = stored.sum(dim=1, keepdim=True) == 0  # an image no earlier step visited
            previous = torch.where(never_written, onehot, stored)
        feats = self.backbone(images)
        logits = self.head(feats)
        loss = pskd_loss(logits, labels, previous, alpha)
        with torch.no_grad():
            self.predictions.write(index, logits.detach().float().softmax(dim=1))
        if self._trainer is not None and self.training and logger_writes_this_step(self._trainer):
            self.log("train/alpha_t", alpha, batch_size=images.shape[0])
        return {"loss": loss, "feats": feats, "logits": logits}


def _positive(limit: int | None) -> bool:
    return limit is not None and limit > 0
