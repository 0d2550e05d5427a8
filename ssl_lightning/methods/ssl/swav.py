"""SwAV (Caron et al., NeurIPS 2020): predict each global crop's balanced cluster code from every
other crop."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributed.fsdp import FullyShardedDataParallel

from ssl_lightning.components.heads import MLPHead, Prototypes
from ssl_lightning.components.memory import FeatureQueue
from ssl_lightning.components.multicrop import forward_per_resolution
from ssl_lightning.distributed import rank, world_size
from ssl_lightning.losses.sinkhorn import sinkhorn_knopp
from ssl_lightning.losses.swav import swapped_prediction
from ssl_lightning.methods.ssl.base import SSLMethod

#: crops whose codes are computed (the official ``crops_for_assign``): the two global crops, which come first
NUM_ASSIGNED_CROPS = 2


class SwAV(SSLMethod):
    """SwAV with the official defaults of its batch-256 recipe (``scripts/swav_*_bs256_pretrain.sh``):
    projector 2 layers (2048 hidden, 128 out), 3,000 prototypes, temperature 0.1, Sinkhorn-Knopp
    with epsilon 0.05 and 3 iterations, a queue of 3,840 past projections per global crop used for
    the codes from epoch 15, prototypes frozen for the first epoch, LARS with LR 0.6 per 256 images,
    no warm-up, a cosine decay to 1/1000 of the peak, and weight decay 1e-6. (The official runs at
    batch 4,096 have no queue, 10 warm-up epochs and LR 4.8: 0.3 per 256 images.)

    Each step, the prototypes are renormalised to unit length; the projections of every crop are
    L2-normalised and scored against them. The codes of the two global crops come from
    :func:`~ssl_lightning.losses.sinkhorn.sinkhorn_knopp` over the global batch (and, from
    ``epoch_queue_starts``, the queue too: small batches cannot be split evenly over 3,000
    prototypes), and every other crop predicts them
    (:func:`~ssl_lightning.losses.swav.swapped_prediction`). With a multi-crop view recipe
    (``data.views: dino``: 2 global crops, then local ones) the local crops only predict. Crops of
    one resolution go through the backbone together, as in the official code.

    Departures: the queue is a :class:`FeatureQueue` of the global batch, filled from the first
    step (the official one starts empty at ``epoch_queue_starts`` and is used once full); it holds
    one row per image (both global crops' projections side by side), and each rank scores its own
    share of the rows, so the Sinkhorn batch is the queue plus the global batch, as one process.
    The freeze counts epochs (the official code counts iterations: 5,005, one epoch at batch 256).

    Args:
        temperature: softmax temperature of the predictions.
        epsilon, sinkhorn_iterations: Sinkhorn-Knopp's entropy weight and rounds.
        num_prototypes: number of prototypes (clusters) K.
        proj_hidden_dim, proj_dim: projector widths.
        queue_size: images whose global-crop projections the queue holds (0: no queue); a multiple
            of the global batch, at most the training set.
        epoch_queue_starts: first epoch whose codes use the queue (at least 1: the queue must
            hold real projections by then).
        freeze_prototypes_epochs: epochs during which the prototypes get no update.
        lr, weight_decay, warmup_epochs, min_lr_ratio: the official batch-256 schedule (see :class:`TrainModule`).
        **kwargs: backbone, optimizer and schedule arguments of :class:`SSLMethod`.
    """

    expected_views = (NUM_ASSIGNED_CROPS, 10)  # two global crops (+ up to eight local ones)

    def __init__(
        self,
        temperature: float = 0.1,
        epsilon: float = 0.05,
        sinkhorn_iterations: int = 3,
        num_prototypes: int = 3000,
        proj_hidden_dim: int = 2048,
        proj_dim: int = 128,
        queue_size: int = 3840,
        epoch_queue_starts: int = 15,
        freeze_prototypes_epochs: int = 1,
        lr: float = 0.6,
        weight_decay: float = 1e-6,
        warmup_epochs: float = 0.0,
        min_lr_ratio: float = 1e-3,
        **kwargs: Any,
    ):
        if queue_size < 0 or (queue_size and epoch_queue_starts < 1):
            raise ValueError(
                f"SwAV needs queue_size >= 0 (0: no queue) and, with a queue, epoch_queue_starts >= 1 (it starts "
                f"filled with random vectors and must hold real projections when used); got queue_size={queue_size}, "
                f"epoch_queue_starts={epoch_queue_starts}"
            )
        super().__init__(lr=lr, weight_decay=weight_decay, warmup_epochs=warmup_epochs, min_lr_ratio=min_lr_ratio,
                         **kwargs)
        self.queue: FeatureQueue | None = None

    def build_heads(self, feat_dim: int) -> None:
        hp = self.hparams
        self.projector = MLPHead(feat_dim, hp.proj_hidden_dim, hp.proj_dim, num_layers=2)
        self.prototypes = Prototypes(hp.proj_dim, hp.num_prototypes)
        if hp.queue_size:
            self.queue = FeatureQueue(hp.queue_size, NUM_ASSIGNED_CROPS * hp.proj_dim)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.queue is not None:
            self.queue.check_fits(self.global_batch_size(), self.num_train_images, type(self).__name__)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        with _full_weights(self.prototypes):
            self.prototypes.normalize_()

    def shared_step(self, batch: dict) -> dict:
        views = batch["views"]
        num_images = views[0].shape[0]
        feats = forward_per_resolution(self.backbone, views)
        projections = F.normalize(self.projector(feats), dim=1)
        scores = self.prototypes(projections).view(len(views), num_images, -1)
        assigned = projections[: NUM_ASSIGNED_CROPS * num_images].detach().view(NUM_ASSIGNED_CROPS, num_images, -1)
        codes = self._codes(scores[:NUM_ASSIGNED_CROPS].detach())
        loss = swapped_prediction(scores, codes, self.hparams.temperature)
        if self.queue is not None:  # after the codes: a batch is not its own queue
            self.queue.push(assigned.transpose(0, 1).reshape(num_images, -1))
        return {"loss": loss, "feats": feats[:num_images], "embeds": projections[:num_images]}

    @torch.no_grad()
    def _codes(self, scores: Tensor) -> Tensor:
        """Sinkhorn-Knopp codes ``[A, N, K]`` of the assigned crops' scores ``[A, N, K]``."""
        hp = self.hparams
        if self.queue is None or self.current_epoch < hp.epoch_queue_starts:
            return torch.stack([sinkhorn_knopp(crop, hp.epsilon, hp.sinkhorn_iterations) for crop in scores])
        # Every rank holds the whole queue; each scores its own share, so that the all-reduced
        # Sinkhorn batch counts every queued image once.
        queued = self.queue.snapshot().chunk(world_size())[rank()].view(-1, NUM_ASSIGNED_CROPS, hp.proj_dim)
        num_images = scores.shape[1]
        return torch.stack([
            sinkhorn_knopp(torch.cat([self.prototypes(queued[:, crop]), scores[crop]]), hp.epsilon,
                           hp.sinkhorn_iterations)[-num_images:]
            for crop in range(NUM_ASSIGNED_CROPS)
        ])

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        super().on_before_optimizer_step(optimizer)
        # The official freeze: the prototypes' gradients dropped, so the optimizer leaves them
        # (and their weight decay and momentum) alone while the codes are still near random.
        if self.current_epoch < self.hparams.freeze_prototypes_epochs:
            for parameter in self.prototypes.parameters():
                parameter.grad = None


def _full_weights(module: torch.nn.Module):
    """Inside, an FSDP unit's parameters have their full shape and in-place changes reach every
    rank's shard (a no-op without FSDP): a row normalisation needs whole rows."""
    if isinstance(module, FullyShardedDataParallel):
        return FullyShardedDataParallel.summon_full_params(module, writeback=True)
    return nullcontext()
