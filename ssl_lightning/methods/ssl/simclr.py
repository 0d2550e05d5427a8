"""SimCLR (Chen et al., ICML 2020): two views, NT-Xent over the global batch."""

from __future__ import annotations

from ssl_lightning.components.heads import MLPHead
from ssl_lightning.losses import nt_xent
from ssl_lightning.methods.ssl.base import SSLMethod


class SimCLR(SSLMethod):
    """SimCLR with the paper's defaults: 2-layer projector (2048 hidden, 128 out, BN as in the
    official code), temperature 0.1, LARS with LR 0.3 per 256 images and weight decay 1e-6.

    Args:
        temperature: softmax temperature of NT-Xent.
        proj_hidden_dim, proj_dim: projector widths.
        **kwargs: backbone, optimizer and schedule arguments of :class:`SSLMethod`.
    """

    def __init__(self, temperature: float = 0.1, proj_hidden_dim: int = 2048, proj_dim: int = 128, **kwargs):
        super().__init__(**kwargs)
        self.temperature = temperature
        self.proj_hidden_dim = proj_hidden_dim
        self.proj_dim = proj_dim

    def build_heads(self, feat_dim: int) -> None:
        self.projector = MLPHead(feat_dim, self.proj_hidden_dim, self.proj_dim, num_layers=2)

    def shared_step(self, batch: dict) -> dict:
        view1, view2 = batch["views"]
        feats1, feats2 = self.backbone(view1), self.backbone(view2)
        loss = nt_xent(self.projector(feats1), self.projector(feats2), self.temperature)
        return {"loss": loss, "feats": feats1}
