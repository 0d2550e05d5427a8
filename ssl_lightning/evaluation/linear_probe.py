"""Linear evaluation: a linear classifier trained on a frozen pretrained backbone's features."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from ssl_lightning.core.data_link import read_batch_size
from ssl_lightning.core.optimization import OptimizationConfig, configure_optimization
from ssl_lightning.core.step_logging import log_learning_rates
from ssl_lightning.evaluation.frozen import FrozenBackboneModule, encode_split
from ssl_lightning.losses import labelled_cross_entropy
from ssl_lightning.optim import param_groups
from ssl_lightning.strategies import unsharded_parameters


class LinearProbe(FrozenBackboneModule):
    """Linear probe on the frozen backbone of a method checkpoint (``feats``, eval-mode BatchNorm).

    With ``feature_cache`` (the default) the un-augmented train and val splits are encoded once at
    fit start and every step trains on the cached features of the batch's images (looked up by
    ``index``): no augmentation, one backbone pass per image in total. Without it, each step encodes
    the batch's first view, so the DataModule's ``views`` recipe is the probe's augmentation.

    Optimizer: SGD with momentum, cosine decay per step from ``lr`` to 0 over the run, no warm-up;
    ``lr`` is used as given (no batch-size scaling); the bias is not decayed. It is built by the
    methods' own path (``core.optimization``). The epochs are the Trainer's ``max_epochs``.
    Logs ``train/linear_loss``, ``val/linear_top1`` and ``val/linear_top5``; after ``fit`` writes
    ``linear_top1.json`` and a line of ``results.md`` into the run directory.

    Args:
        pretrained: method checkpoint whose backbone is evaluated.
        lr: peak learning rate (absolute).
        momentum, weight_decay, nesterov: SGD's.
        feature_cache: train on features cached once (True) or encode every batch (False).
    """

    def __init__(
        self,
        pretrained: str,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        feature_cache: bool = True,
        num_classes: int | None = None,
        batch_size: int | None = None,
        in_chans: int | None = None,
        image_size: int | None = None,
    ):
        super().__init__(pretrained, num_classes, batch_size, in_chans, image_size)
        self.head: nn.Linear | None = None
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def configure_model(self) -> None:
        super().configure_model()
        if self.head is not None:
            return
        if not self.hparams.num_classes:
            raise ValueError(
                "LinearProbe needs num_classes: use a labelled DataModule (it links num_classes) or pass num_classes."
            )
        self.head = nn.Linear(self.feat_dim, self.hparams.num_classes)
        self.val_top1 = MulticlassAccuracy(self.hparams.num_classes, average="micro")
        top_k = min(5, self.hparams.num_classes)
        self.val_top5 = MulticlassAccuracy(self.hparams.num_classes, top_k=top_k, average="micro")

    def on_fit_start(self) -> None:
        if not self.hparams.feature_cache:
            return
        plain = getattr(self.trainer.datamodule, "plain_dataloader", None)
        if plain is None:
            raise ValueError(
                "LinearProbe(feature_cache=True) needs an ssl_lightning DataModule (one with plain_dataloader()) "
                "to encode the un-augmented splits once; pass datamodule= or set feature_cache=False."
            )
        # Every process encodes both splits whole: lookups by index then work under any sampler.
        self._cache = {split: encode_split(self.backbone, plain(split), self.device) for split in ("train", "val")}
        rank_zero_info(f"LinearProbe: cached {self.feat_dim}-d features of "
                       f"{len(self._cache['train'][0])} train and {len(self._cache['val'][0])} val images")

    def _features(self, batch: dict, split: str) -> torch.Tensor:
        if self._cache:
            return self._cache[split][0][batch["index"]]
        with torch.no_grad():
            return self.backbone(batch["views"][0]).float()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = labelled_cross_entropy(self.head(self._features(batch, "train")), batch["label"])
        self.log("train/linear_loss", loss, prog_bar=True, batch_size=len(batch["label"]), sync_dist=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        labelled = batch["label"] >= 0
        logits = self.head(self._features(batch, "val")[labelled])
        self.val_top1(logits, batch["label"][labelled])
        self.val_top5(logits, batch["label"][labelled])
        self.log("val/linear_top1", self.val_top1, prog_bar=True)
        self.log("val/linear_top5", self.val_top5)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        log_learning_rates(self)

    def configure_optimizers(self):
        hp = self.hparams
        config = OptimizationConfig(
            optimizer="sgd", lr=hp.lr, lr_scaling="none", weight_decay=hp.weight_decay, momentum=hp.momentum,
            optimizer_kwargs={"nesterov": hp.nesterov},
        )
        with unsharded_parameters(self.trainer):
            groups = param_groups(self.head, hp.weight_decay)
        return configure_optimization(config, groups, self.trainer, hp.batch_size or read_batch_size(self.trainer))

    def on_fit_end(self) -> None:
        top1 = self.trainer.callback_metrics.get("val/linear_top1")
        if top1 is None:
            rank_zero_warn("LinearProbe: no validation ran (limit_val_batches=0?), so no result was written.")
            return
        hp = self.hparams
        cache = "features cached once, no augmentation" if hp.feature_cache else "features of views[0] per step"
        protocol = (f"linear probe on frozen backbone feats ({cache}); SGD lr {hp.lr}, momentum {hp.momentum}, "
                    f"wd {hp.weight_decay}, cosine per step, batch {hp.batch_size}")
        self.write_result(protocol, "linear_top1", 100.0 * float(top1), epochs=self.trainer.current_epoch)
