"""``SupervisedMethod``: what supervised and distillation methods add to the shared ``TrainModule``.

A classifier head, labels (a DataModule without them is refused), top-1 / top-5 accuracy in
training, validation and ``test``, and predictions (logits and probabilities) in ``predict``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError

from ssl_lightning.components.frozen_teacher import FrozenTeacher
from ssl_lightning.components.heads import LinearClassifier
from ssl_lightning.core.data_link import read_data_facts, require_views
from ssl_lightning.core.module import TrainModule
from ssl_lightning.core.step_logging import log_labelled_accuracy
from ssl_lightning.datamodules.base import QUERIES
from ssl_lightning.evaluation.results import write_result
from ssl_lightning.methods.supervised.labels import LabelRange

TOP_K = (1, 5)

#: equal-width confidence bins of the expected calibration error (Guo et al. 2017; PS-KD reports it)
ECE_BINS = 15


class SupervisedMethod(TrainModule):
    """Base class of supervised methods: the ``Classifier`` baseline and the distillation students.

    ``build_heads`` makes ``head``, a ``LinearClassifier`` on the backbone's features; a subclass
    implements ``shared_step(batch)`` returning ``loss``, ``feats`` and, when the batch's labels are
    what the logits should predict, ``logits`` (training top-1 / top-5 are logged from them). Rows
    labelled -1 are unlabelled: losses mask them (``losses.labelled_cross_entropy``), so a batch
    with some or none labelled trains without a host sync, and without stalling DDP.

    A distillation student holds its teacher as a ``FrozenTeacher`` attribute; ``setup("fit")``
    loads it (validate, test and predict need no teacher file).

    Labels are required: a DataModule without classes stops in ``setup``, and so does a
    ``num_classes`` below the DataModule's; a training label beyond ``num_classes`` (data that
    mislabels its classes, plain dataloaders) stops the run at the next logger step with both
    numbers (``LabelRange``).

    Logged: ``train/top1``, ``train/top5`` (labelled rows of the global batch, logger steps);
    ``val/loss``, ``val/top1``, ``val/top5``, ``val/ece``; ``test/top1``, ``test/top5``, ``test/ece``
    with ``test``, which also writes ``test_top1.json``, ``test_top5.json``, ``test_ece.json`` and
    lines of ``results.md`` (percent) into the run directory. ECE is the expected calibration error
    over 15 equal-width confidence bins of the top-1 softmax probability (Guo et al. 2017):
    sum over bins of (share of images) x |accuracy - mean confidence|. ``validation_step`` returns ``feats`` and, as ``embeds``, the logits, so the kNN and
    spectrum monitors work as for the self-supervised methods; ``predict_step`` returns ``feats``,
    ``logits``, ``probs`` (softmax), ``label`` and ``index``. ``forward`` gives the logits.

    Defaults are the standard supervised CIFAR recipe's: SGD, LR 0.1 per 256 images, momentum 0.9,
    weight decay 5e-4, no warm-up, cosine.

    Args:
        **kwargs: backbone, data, optimizer and schedule arguments of :class:`TrainModule`.
    """

    expected_views: int | tuple[int, int] = 1

    def __init__(
        self,
        optimizer: str = "sgd",
        lr: float = 0.1,
        weight_decay: float = 5e-4,
        warmup_epochs: float = 0.0,
        **kwargs: Any,
    ):
        super().__init__(optimizer=optimizer, lr=lr, weight_decay=weight_decay, warmup_epochs=warmup_epochs, **kwargs)
        self.head: LinearClassifier | None = None
        self.labels_in_range = LabelRange(type(self).__name__)

    # ----------------------------------------------------------------- building
    def setup(self, stage: str) -> None:
        super().setup(stage)
        facts = read_data_facts(self.trainer)
        if facts is not None:
            self._check_labels_against(facts)
        if stage == "fit":  # a distillation student's teacher; validate, test and predict need none
            hp = self.hparams
            for teacher in (module for module in self.children() if isinstance(module, FrozenTeacher)):
                teacher.load(hp.num_classes, hp.in_chans, self.trainer.datamodule, hp.channels_last)

    def _check_labels_against(self, facts) -> None:
        datamodule = type(self.trainer.datamodule).__name__
        if not facts.num_classes:
            raise ValueError(
                f"{type(self).__name__} needs labelled data, but the DataModule {datamodule} has no labels "
                "(num_classes is None): use a labelled dataset (class folders, an .npz with labels), or a "
                "self-supervised method."
            )
        if self.hparams.num_classes < facts.num_classes:
            raise ValueError(
                f"{type(self).__name__}: num_classes={self.hparams.num_classes}, but the DataModule {datamodule} has "
                f"{facts.num_classes} classes (labels up to {facts.num_classes - 1}). Set model.init_args.num_classes "
                f"to {facts.num_classes} or leave it unset to take the DataModule's."
            )

    def build_heads(self, feat_dim: int) -> None:
        if not self.hparams.num_classes:
            raise ValueError(
                f"{type(self).__name__} needs num_classes: use a labelled DataModule (it links num_classes) or pass it."
            )
        self.head = LinearClassifier(feat_dim, self.hparams.num_classes)

    def configure_model(self) -> None:
        super().configure_model()
        if not hasattr(self, "val_top1"):  # after compile: torchmetrics objects stay eager
            classes = self.hparams.num_classes
            for stage in ("val", "test"):
                for k in TOP_K:
                    metric = MulticlassAccuracy(classes, top_k=min(k, classes), average="micro", ignore_index=-1)
                    setattr(self, f"{stage}_top{k}", metric)
                ece = MulticlassCalibrationError(classes, n_bins=ECE_BINS, norm="l1", ignore_index=-1)
                setattr(self, f"{stage}_ece", ece)
            self.val_loss = MeanMetric()

    # ----------------------------------------------------------------- outputs
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))

    def embed(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.backbone(images)
        return {"feats": feats, "embeds": self.head(feats)}

    # ----------------------------------------------------------------- Lightning hooks
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        require_views(batch, type(self).__name__)
        labels = self.labels_in_range.masked(batch["label"], self.hparams.num_classes)
        return super().training_step({**batch, "label": labels}, batch_idx)

    def training_extras(self, batch: dict, out: dict[str, torch.Tensor], logs_now: bool) -> None:
        if logs_now:
            self.labels_in_range.check(self.trainer, self.hparams.num_classes)
            if "logits" in out:
                log_labelled_accuracy(self, out["logits"], batch["label"], {k: f"train/top{k}" for k in TOP_K})
        return None

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        require_views(batch, type(self).__name__)
        out = self.embed(batch["views"][0])
        labels = batch["label"]
        if dataloader_idx == QUERIES:  # not the kNN bank
            labelled = labels >= 0
            per_image = F.cross_entropy(out["embeds"].float(), labels.clamp(min=0), reduction="none")
            self.val_loss.update(per_image, labelled.float())
            self.log("val/loss", self.val_loss, add_dataloader_idx=False)
            self._log_accuracy("val", out["embeds"], labels)
        return {**out, "label": labels, "index": batch["index"]}

    def test_step(self, batch: dict, batch_idx: int) -> None:
        require_views(batch, type(self).__name__)
        self._log_accuracy("test", self(batch["views"][0]), batch["label"])

    def _log_accuracy(self, stage: str, logits: torch.Tensor, labels: torch.Tensor) -> None:
        for k in TOP_K:
            metric = getattr(self, f"{stage}_top{k}")
            metric(logits, labels)
            self.log(f"{stage}/top{k}", metric, prog_bar=k == 1, add_dataloader_idx=False)
        ece = getattr(self, f"{stage}_ece")
        ece(logits.float(), labels)
        self.log(f"{stage}/ece", ece, add_dataloader_idx=False)

    def on_test_end(self) -> None:
        protocol = f"{type(self).__name__} logits on the un-augmented held-out split"
        for name in [f"top{k}" for k in TOP_K] + ["ece"]:
            value = self.trainer.callback_metrics.get(f"test/{name}")
            if value is not None:  # the epochs column stays empty: the checkpoint's training is not this run's
                write_result(self.trainer, protocol, f"test_{name}", 100.0 * float(value), None, self.trainer.ckpt_path)

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        require_views(batch, type(self).__name__)
        feats = self.backbone(batch["views"][0])
        logits = self.head(feats)
        return {"feats": feats, "logits": logits, "probs": logits.float().softmax(dim=1), "label": batch["label"],
                "index": batch["index"]}

    def on_validation_start(self) -> None:
        super().on_validation_start()
        self.labels_in_range.check(self.trainer, self.hparams.num_classes)

    def on_train_end(self) -> None:
        super().on_train_end()
        self.labels_in_range.check(self.trainer, self.hparams.num_classes)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self._trainer is not None:
            self.labels_in_range.check(self._trainer, self.hparams.num_classes)
        super().on_save_checkpoint(checkpoint)
