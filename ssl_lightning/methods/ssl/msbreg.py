"""MSBReg (Moon et al., WACV 2023, "An Embedding-Dynamic Approach to Self-supervised Learning"): BYOL's
delayed target with a multiview centroid loss, a singular value loss and a Brownian diffusive loss."""

from __future__ import annotations

import torch
from torch import nn

from ssl_lightning.components.heads import MLPHead
from ssl_lightning.components.teacher import EMATeacher
from ssl_lightning.core.step_logging import logger_writes_this_step
from ssl_lightning.distributed import rank, world_size
from ssl_lightning.losses import brownian_diffusive_loss, multiview_centroid_loss
from ssl_lightning.methods.ssl.base import SSLMethod

#: the most views per image a step takes (every view costs a student and a teacher pass)
MAX_VIEWS = 8


class MSBReg(SSLMethod):
    """MSBReg: an online network (backbone, projector, predictor) and BYOL's EMA target (backbone,
    projector) see V >= 2 views of each image; the loss is

        L = L_centroid(predictions, target projections) + brownian_weight x L_brownian(projections)
            + singular_value_weight x L_singular_value(projections)

    (:mod:`ssl_lightning.losses.msbreg`). The online projections of all V views are the particles of
    the two dispersive terms and the ``embeds`` this step returns; the singular value term is
    ``SSLMethod``'s regulariser (``loss/singular_value``), which here defaults on. Each view runs through
    the networks separately (BatchNorm statistics per view, as BYOL's two views).

    Defaults: BYOL's networks and optimisation (projector and predictor 4096-256, target momentum 0.996
    -> 1 on the cosine schedule, LARS LR 0.2 per 256 images, weight decay 1.5e-6), on which the paper
    builds. The loss weights (1 for the centroid term, 1 for the singular value term, 0.1 for the
    Brownian term) are this library's choice: the paper's values could not be read (see
    ``ssl_lightning.losses.msbreg``). The view count comes from the DataModule's recipe
    (``configs/cifar10/msbreg.yaml`` uses four).

    The Brownian directions are drawn each step from the global RNG, for the global batch and sliced
    by rank, so that ranks with the same RNG state still give every particle its own direction (and
    N equal shards draw what one process draws on their concatenation).

    Args:
        singular_value_weight: weight of the singular value loss (``SSLMethod``'s regulariser).
        brownian_weight: weight of the Brownian diffusive loss, the scale of the random kicks.
        base_momentum, final_momentum: EMA momentum of the target network at the first and last step.
        proj_hidden_dim, proj_dim: projector widths.
        pred_hidden_dim: predictor's hidden width.
        **kwargs: backbone, optimizer and schedule arguments of :class:`SSLMethod`.
    """

    expected_views = (2, MAX_VIEWS)

    def __init__(
        self,
        singular_value_weight: float = 1.0,
        brownian_weight: float = 0.1,
        base_momentum: float = 0.996,
        final_momentum: float = 1.0,
        proj_hidden_dim: int = 4096,
        proj_dim: int = 256,
        pred_hidden_dim: int = 4096,
        lr: float = 0.2,
        weight_decay: float = 1.5e-6,
        **kwargs,
    ):
        if not brownian_weight >= 0:
            raise ValueError(
                f"MSBReg: brownian_weight must be >= 0 (0 turns the Brownian loss off), got {brownian_weight}"
            )
        super().__init__(singular_value_weight=singular_value_weight, lr=lr, weight_decay=weight_decay, **kwargs)

    def build_heads(self, feat_dim: int) -> None:
        hp = self.hparams
        self.projector = MLPHead(feat_dim, hp.proj_hidden_dim, hp.proj_dim)
        self.predictor = MLPHead(hp.proj_dim, hp.pred_hidden_dim, hp.proj_dim)
        self.teacher = EMATeacher(self._online_network(), hp.base_momentum, hp.final_momentum)

    def _online_network(self) -> nn.Module:
        # The part of the student the teacher mirrors (the predictor has no teacher counterpart).
        return nn.Sequential(self.backbone, self.projector)

    def shared_step(self, batch: dict) -> dict:
        views = batch["views"]
        feats = [self.backbone(view) for view in views]
        projections = [self.projector(f) for f in feats]
        predictions = torch.stack([self.predictor(p) for p in projections])  # [V, N, D]
        targets = torch.stack([self.teacher(view) for view in views])
        centroid = multiview_centroid_loss(predictions, targets)
        particles = torch.cat(projections)  # [V * N, D], view-major
        brownian = brownian_diffusive_loss(particles, self.brownian_directions(len(views), *projections[0].shape))
        loss = centroid + self.hparams.brownian_weight * brownian
        return {"loss": loss, "loss/centroid": centroid.detach(), "loss/brownian": brownian.detach(),
                "feats": feats[0], "embeds": particles}

    def brownian_directions(self, num_views: int, num_images: int, dim: int) -> torch.Tensor:
        """[V * N, D] Gaussian directions, view-major: this rank's images' columns of a [V, N x ranks, D]
        draw (equal shards, as training batches are)."""
        drawn = torch.randn(num_views, world_size() * num_images, dim, device=self.device)
        return drawn[:, rank() * num_images : (rank() + 1) * num_images].flatten(0, 1)

    def on_optimizer_step(self, step: int) -> None:
        momentum = self.teacher.momentum(step, int(self.trainer.estimated_stepping_batches))
        self.teacher.update(self._online_network(), momentum)
        if logger_writes_this_step(self.trainer):
            self.log("momentum", momentum, batch_size=1)
