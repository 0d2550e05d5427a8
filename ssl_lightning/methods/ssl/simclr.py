"""SimCLR (Chen et al., ICML 2020): two views, NT-Xent over the global batch."""

from __future__ import annotations

from ssl_lightning.components.heads import MLPHead
from ssl_lightning.losses import nt_xent
from ssl_lightning.methods.ssl.base import SSLMethod


class SimCLR(SSLMethod):
    """SimCLR with the paper's defaults: 2-layer projector (2048 hidden, 128 out, BN as in the
    official code), temperature 0.1, LARS with LR 0.3 per 256 images and weight decay 1e-6.

    SimCLRv2 (Chen et al., NeurIPS 2020, "Big Self-Supervised Models are Strong Semi-Supervised
    Learners") deepens the projector to 3 layers (``proj_layers=3``; google-research/simclr
    ``tf2/run.py`` ``num_proj_layers=3``) and fine-tunes from its first layer (``FineTune``
    ``projector_layers=1``; docs/evaluation.md, "SimCLRv2 semi-supervised pipeline"). The official
    v2 head makes its hidden layers as wide as its input (``tf2/model.py`` ``ProjectionHead``) and
    ends in BatchNorm without bias; ours is an :class:`MLPHead` (widths given, plain linear output).

    Args:
        temperature: softmax temperature of NT-Xent.
        proj_hidden_dim, proj_dim: projector widths.
        proj_layers: linear layers of the projector, each hidden one Linear-BN-ReLU: 2 = SimCLR (v1,
            the default, so existing recipes and checkpoints are unchanged), 3 = SimCLRv2.
        **kwargs: backbone, optimizer and schedule arguments of :class:`SSLMethod`.
    """

    def __init__(
        self, temperature: float = 0.1, proj_hidden_dim: int = 2048, proj_dim: int = 128, proj_layers: int = 2,
        **kwargs,
    ):
        if proj_layers < 1:
            raise ValueError(f"SimCLR: proj_layers must be at least 1 (2: SimCLR, 3: SimCLRv2), got {proj_layers}.")
        super().__init__(**kwargs)
        self.temperature = temperature
        self.proj_hidden_dim = proj_hidden_dim
        self.proj_dim = proj_dim
        self.proj_layers = proj_layers

    def build_heads(self, feat_dim: int) -> None:
        self.projector = MLPHead(feat_dim, self.proj_hidden_dim, self.proj_dim, num_layers=self.proj_layers)

    def shared_step(self, batch: dict) -> dict:
        view1, view2 = batch["views"]
        feats1, feats2 = self.backbone(view1), self.backbone(view2)
        embeds = self.projector(feats1)
        loss = nt_xent(embeds, self.projector(feats2), self.temperature)
        return {"loss": loss, "feats": feats1, "embeds": embeds}
