"""iSogCLR (Qiu et al., ICML 2023): SimCLR's architecture with a learned temperature per training image."""

from __future__ import annotations

from typing import Literal

import torch

from ssl_lightning.components.heads import MLPHead
from ssl_lightning.components.memory import IndexedMemory
from ssl_lightning.core.data_link import per_image_memory_size
from ssl_lightning.core.step_logging import logger_writes_this_step
from ssl_lightning.losses.isogclr import isogclr, isogclr_temperature_step
from ssl_lightning.methods.ssl.base import SSLMethod


class ISogCLR(SSLMethod):
    """iSogCLR: the robust global contrastive loss, with each training image's temperature tau_i
    learned by its own momentum-SGD step and each image's partition term tracked by a moving average
    (``losses.isogclr``), so that small batches optimise the global objective.

    Per-image state lives in three :class:`IndexedMemory` buffers keyed by ``batch["index"]``
    (checkpointed with the model): ``partition`` (u_i, 0 until first seen), ``tau`` (tau_init until
    first seen) and ``tau_momentum`` (the tau gradient's moving average, m_i). A step reads the
    batch's tau_i and u_i, computes the loss, then writes the new u_i, m_i and tau_i.

    Defaults follow the authors' unimodal code (github.com/zhqiu/contrastive-learning-iSogCLR,
    unimodal_exps: ``SogCLR_DRO_Loss`` and the README's ResNet-18 script): tau_init 0.1, tau in
    [0.05, 1.0], rho 0.4, gamma 0.8, beta_u 0.5, eta 0.03 (constant), tau gradient clipped at 3;
    SGD (momentum 0.9) with LR 0.8 per 128 images (0.8 * 2 = 1.6 per 256 here), weight decay 5e-4,
    10 warm-up epochs and cosine decay to 1e-3 of the peak. Departures: the projector is SimCLR's
    2-layer MLP (2048 hidden, 128 out) where the authors' script puts a 3-layer 8192-wide MLP on
    every method it compares; and the authors' loop starts at epoch 1, so its ``epoch == 0`` branch
    (u_i = the batch estimate) never runs and a first visit gets u_i = gamma * g: we take the batch
    estimate on each image's first visit, as LibAUC's ``GCLoss_v1`` (same authors) does.

    The memories need the number of training images: the DataModule reports it
    (``num_train_images``), or pass ``num_train_images`` for bare dataloaders. It is stored in the
    hyperparameters, so ``load_from_checkpoint`` rebuilds memories of the saved size without data.

    Args:
        tau_init: every image's temperature before its first update.
        tau_min, tau_max: the range tau_i is projected onto.
        rho: the DRO radius of the robust loss (larger favours larger temperatures).
        gamma: weight of the batch's estimate in u_i's moving average.
        beta_u: weight of the new gradient in the tau gradient's moving average.
        eta: step size of the temperature update.
        tau_grad_clip: bound on each tau gradient's magnitude.
        num_train_images: size of the per-image memories; None takes it from the DataModule.
        proj_hidden_dim, proj_dim: projector widths.
        **kwargs: backbone, optimizer and schedule arguments of :class:`SSLMethod`.
    """

    def __init__(
        self,
        tau_init: float = 0.1,
        tau_min: float = 0.05,
        tau_max: float = 1.0,
        rho: float = 0.4,
        gamma: float = 0.8,
        beta_u: float = 0.5,
        eta: float = 0.03,
        tau_grad_clip: float = 3.0,
        num_train_images: int | None = None,
        proj_hidden_dim: int = 2048,
        proj_dim: int = 128,
        optimizer: Literal["lars", "sgd", "adamw", "lamb", "adamp", "adam"] = "sgd",
        lr: float = 1.6,
        weight_decay: float = 5e-4,
        **kwargs,
    ):
        super().__init__(optimizer=optimizer, lr=lr, weight_decay=weight_decay, **kwargs)
        if not 0 < tau_min <= tau_init <= tau_max:
            raise ValueError(f"ISogCLR needs 0 < tau_min <= tau_init <= tau_max, got {tau_min}, {tau_init}, {tau_max}")

    def build_heads(self, feat_dim: int) -> None:
        hp = self.hparams
        self.projector = MLPHead(feat_dim, hp.proj_hidden_dim, hp.proj_dim, num_layers=2)
        size = self._memory_size()
        self.partition = IndexedMemory(size, fill=0.0)
        self.tau = IndexedMemory(size, fill=hp.tau_init)
        self.tau_momentum = IndexedMemory(size, fill=0.0)

    def _memory_size(self) -> int:
        return per_image_memory_size(self, "a temperature per training image")

    def shared_step(self, batch: dict) -> dict:
        if "index" not in batch:
            raise KeyError(
                "ISogCLR needs batch['index'], each image's position in the training set, to address its "
                "temperature: use an ssl_lightning DataModule, or a dataset whose items carry 'index'."
            )
        index = batch["index"]
        view1, view2 = batch["views"]
        feats1, feats2 = self.backbone(view1), self.backbone(view2)
        hp = self.hparams
        tau, partition = self.tau.read(index), self.partition.read(index)
        embeds = self.projector(feats1)
        step = isogclr(embeds, self.projector(feats2), tau, partition, hp.gamma, hp.rho, hp.tau_grad_clip)
        with torch.no_grad():
            new_tau, momentum = isogclr_temperature_step(
                tau, self.tau_momentum.read(index), step.tau_grad, hp.eta, hp.beta_u, hp.tau_min, hp.tau_max
            )
            self.partition.write(index, step.partition)
            self.tau_momentum.write(index, momentum)
            self.tau.write(index, new_tau)
        if self._trainer is not None and self.training and logger_writes_this_step(self._trainer):
            self.log("tau/mean", tau.mean(), batch_size=tau.shape[0])
        return {"loss": step.loss, "feats": feats1, "embeds": embeds}
