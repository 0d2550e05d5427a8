"""Barlow Twins (Zbontar et al., ICML 2021): redundancy reduction of the cross-correlation."""

from __future__ import annotations

from ssl_lightning.components.heads import MLPHead
from ssl_lightning.losses import barlow_twins
from ssl_lightning.methods.ssl.base import SSLMethod


class BarlowTwins(SSLMethod):
    """Barlow Twins with the paper's defaults: 3-layer projector of width 8192 without biases,
    lambda 5e-3, LARS with LR 0.2 per 256 images and weight decay 1.5e-6.

    Args:
        lambda_offdiag: weight of the off-diagonal (redundancy) term.
        loss_scale: multiplies the loss (solo-learn's CIFAR recipe uses 0.1; the paper 1).
        proj_hidden_dim, proj_dim: projector widths.
        **kwargs: backbone, optimizer and schedule arguments of :class:`SSLMethod`.
    """

    def __init__(
        self,
        lambda_offdiag: float = 5e-3,
        loss_scale: float = 1.0,
        proj_hidden_dim: int = 8192,
        proj_dim: int = 8192,
        lr: float = 0.2,
        weight_decay: float = 1.5e-6,
        **kwargs,
    ):
        super().__init__(lr=lr, weight_decay=weight_decay, **kwargs)
        self.lambda_offdiag = lambda_offdiag
        self.loss_scale = loss_scale
        self.proj_hidden_dim = proj_hidden_dim
        self.proj_dim = proj_dim

    def build_heads(self, feat_dim: int) -> None:
        self.projector = MLPHead(feat_dim, self.proj_hidden_dim, self.proj_dim, num_layers=3, bias=False)

    def shared_step(self, batch: dict) -> dict:
        view1, view2 = batch["views"]
        feats1, feats2 = self.backbone(view1), self.backbone(view2)
        embeds = self.projector(feats1)
        loss = self.loss_scale * barlow_twins(embeds, self.projector(feats2), self.lambda_offdiag)
        return {"loss": loss, "feats": feats1, "embeds": embeds}
