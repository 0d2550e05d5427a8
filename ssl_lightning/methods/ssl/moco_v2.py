"""MoCo v2 (Chen et al. 2020, "Improved Baselines with Momentum Contrastive Learning"): InfoNCE of a
query encoder against a momentum key encoder and a queue of past keys."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_lightning.components.heads import MLPHead
from ssl_lightning.components.memory import FeatureQueue
from ssl_lightning.components.teacher import EMATeacher
from ssl_lightning.core.step_logging import logger_writes_this_step
from ssl_lightning.losses.moco import info_nce_with_queue
from ssl_lightning.methods.ssl.base import SSLMethod


class MoCoV2(SSLMethod):
    """MoCo v2 with the paper's ImageNet defaults: projector 2048 hidden / 128 out, temperature 0.2,
    a queue of 65,536 keys, key-encoder momentum 0.999 (constant), SGD with LR 0.03 per 256 images,
    weight decay 1e-4, cosine schedule without warm-up.

    The key encoder is an :class:`EMATeacher` of (backbone, projector). Its keys are normalised and
    queued after the loss is built, so a batch's keys are never its own negatives.

    Departures from the paper, each as solo-learn's MoCo V2+:

    * ``symmetric=True`` (the default) adds the loss with the views swapped and averages the two,
      ``(L(q1, k2) + L(q2, k1)) / 2``; the paper computes only ``L(q1, k2)``. The queue then keeps the
      keys of both views, one row per image, and each query's negatives are keys of the view its
      positive comes from (solo-learn's queue per view). ``symmetric=False`` is the paper's loss,
      queueing the keys of the second view only.
    * The projector's hidden layer has BatchNorm (``MLPHead``); MoCo v2's has none.
    * Shuffle-BN is replaced by synchronised BatchNorm (``trainer.sync_batchnorm: true`` with
      several GPUs). Both stop a query from finding its positive key through BatchNorm statistics
      shared by the positive pair: shuffle-BN by normalising keys over a permutation of the global
      batch (an all_gather and a permutation of the images every step), SyncBN by normalising over
      the whole global batch, where one pair's share of the statistics is negligible. On one
      process the statistics are those of the whole batch anyway.

    Args:
        temperature: softmax temperature of InfoNCE.
        proj_hidden_dim, proj_dim: projector widths.
        queue_size: number of queued keys K (per view); a multiple of the global batch.
        base_momentum, final_momentum: key-encoder EMA momentum at the first and last step
            (cosine in between; equal values give MoCo's constant momentum).
        symmetric: average the loss over both assignments of query and key views.
        **kwargs: backbone, optimizer and schedule arguments of :class:`SSLMethod`.
    """

    def __init__(
        self,
        temperature: float = 0.2,
        proj_hidden_dim: int = 2048,
        proj_dim: int = 128,
        queue_size: int = 65536,
        base_momentum: float = 0.999,
        final_momentum: float = 0.999,
        symmetric: bool = True,
        optimizer: Literal["lars", "sgd", "adamw", "lamb", "adamp", "adam"] = "sgd",
        lr: float = 0.03,
        weight_decay: float = 1e-4,
        warmup_epochs: float = 0.0,
        **kwargs,
    ):
        super().__init__(optimizer=optimizer, lr=lr, weight_decay=weight_decay, warmup_epochs=warmup_epochs, **kwargs)
        if temperature <= 0:
            raise ValueError(f"{type(self).__name__} needs temperature > 0, got {temperature}")
        if queue_size < 1:
            raise ValueError(f"{type(self).__name__} needs queue_size >= 1, got {queue_size}")

    @property
    def key_views(self) -> int:
        """Views whose keys are queued: both when the loss is symmetric, the second otherwise."""
        return 2 if self.hparams.symmetric else 1

    def build_heads(self, feat_dim: int) -> None:
        hp = self.hparams
        self.projector = MLPHead(feat_dim, hp.proj_hidden_dim, hp.proj_dim, num_layers=2)
        self.teacher = EMATeacher(self._online_network(), hp.base_momentum, hp.final_momentum)
        # One row per image holding its keys of every queued view side by side, so that one push
        # (one all_gather) serves both views. FeatureQueue's random start rows are unit over the whole
        # row; make each view's slice a unit vector, as the keys pushed later are.
        self.queue = FeatureQueue(hp.queue_size, self.key_views * hp.proj_dim)
        with torch.no_grad():
            self.queue.features.copy_(F.normalize(self._per_view(self.queue.features), dim=2).flatten(1))

    def _online_network(self) -> nn.Module:
        # The part of the query encoder the key encoder mirrors.
        return nn.Sequential(self.backbone, self.projector)

    def _per_view(self, rows: Tensor) -> Tensor:
        return rows.unflatten(1, (self.key_views, self.hparams.proj_dim))

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.queue.check_fits(self.global_batch_size(), self.num_train_images, type(self).__name__)

    def contrast(self, query: Tensor, key: Tensor, negatives: Tensor) -> Tensor:
        """The loss of one (query view, key view) assignment; MoCHi adds its synthetic negatives here."""
        return info_nce_with_queue(query, key, negatives, self.hparams.temperature)

    def shared_step(self, batch: dict) -> dict:
        view1, view2 = batch["views"]
        queued = self._per_view(self.queue.snapshot())  # [K, views, D], read before this batch's keys go in
        feats1 = self.backbone(view1)
        query1, key2 = self.projector(feats1), self.teacher(view2)
        if self.hparams.symmetric:
            query2, key1 = self.projector(self.backbone(view2)), self.teacher(view1)
            loss = (self.contrast(query1, key2, queued[:, 1]) + self.contrast(query2, key1, queued[:, 0])) / 2
            keys = torch.stack([key1, key2], dim=1)
        else:
            loss = self.contrast(query1, key2, queued[:, 0])
            keys = key2[:, None]
        self.queue.push(F.normalize(keys.float(), dim=2).flatten(1))
        return {"loss": loss, "feats": feats1, "embeds": query1}

    def on_optimizer_step(self, step: int) -> None:
        momentum = self.teacher.momentum(step, int(self.trainer.estimated_stepping_batches))
        self.teacher.update(self._online_network(), momentum)
        if logger_writes_this_step(self.trainer):
            self.log("momentum", momentum, batch_size=1)
