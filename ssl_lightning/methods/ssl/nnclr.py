"""NNCLR (Dwibedi et al., ICCV 2021): contrast each view's nearest neighbour in a support queue
with the other view's prediction."""

from __future__ import annotations

import torch.nn.functional as F

from ssl_lightning.components.heads import MLPHead
from ssl_lightning.components.memory import FeatureQueue
from ssl_lightning.losses.batch_info_nce import batch_info_nce
from ssl_lightning.losses.nearest_neighbour import nearest_neighbours
from ssl_lightning.methods.ssl.base import SSLMethod


class NNCLR(SSLMethod):
    """NNCLR with the paper's defaults: temperature 0.1, a support queue of 98,304 projections,
    projector 3 layers (2048 hidden, 256 out, batch-normalised output), predictor 2 layers
    (4096 hidden), LARS with LR 0.3 per 256 images and weight decay 1e-6 (SimCLR's, the base's).

    With NN(z) the support row nearest to z (cosine) and p the predictor's output, the loss is
    ``(L(NN(z1), p2) + L(NN(z2), p1)) / 2`` with L
    :func:`~ssl_lightning.losses.batch_info_nce.batch_info_nce`: each neighbour is scored against
    the predictions of the global batch (which get the gradient; the neighbours come from the
    queue and get none), as solo-learn's ``nnclr_loss_func``. After the loss, the normalised
    projections of view 1 enter the queue.

    Departure: the projector's last BatchNorm has no affine parameters (MLPHead's, as SimCLR v2 and
    MoCo v3); solo-learn's has them. The queue must fit the data (``check_fits`` at fit start):
    CIFAR recipes use less than the paper's 98,304 (larger than the 50,000 training images).

    Args:
        temperature: softmax temperature.
        queue_size: support-set size (a multiple of the global batch, at most the training set).
        proj_hidden_dim, proj_dim, pred_hidden_dim: head widths.
        **kwargs: backbone, optimizer and schedule arguments of :class:`SSLMethod`.
    """

    def __init__(
        self,
        temperature: float = 0.1,
        queue_size: int = 98304,
        proj_hidden_dim: int = 2048,
        proj_dim: int = 256,
        pred_hidden_dim: int = 4096,
        **kwargs,
    ):
        super().__init__(**kwargs)

    def build_heads(self, feat_dim: int) -> None:
        hp = self.hparams
        self.projector = MLPHead(feat_dim, hp.proj_hidden_dim, hp.proj_dim, num_layers=3, last_batch_norm=True)
        self.predictor = MLPHead(hp.proj_dim, hp.pred_hidden_dim, hp.proj_dim)
        self.queue = FeatureQueue(hp.queue_size, hp.proj_dim)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.queue.check_fits(self.global_batch_size(), self.num_train_images, type(self).__name__)

    def shared_step(self, batch: dict) -> dict:
        view1, view2 = batch["views"]
        feats1, feats2 = self.backbone(view1), self.backbone(view2)
        proj1, proj2 = self.projector(feats1), self.projector(feats2)
        pred1, pred2 = self.predictor(proj1), self.predictor(proj2)
        support = self.queue.snapshot()
        neighbour1, neighbour2 = nearest_neighbours(proj1, support), nearest_neighbours(proj2, support)
        t = self.hparams.temperature
        loss = (batch_info_nce(neighbour1, pred2, t) + batch_info_nce(neighbour2, pred1, t)) / 2
        self.queue.push(F.normalize(proj1.detach(), dim=1))
        return {"loss": loss, "feats": feats1, "embeds": proj1}
