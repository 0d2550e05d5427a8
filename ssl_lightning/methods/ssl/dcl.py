"""DCL and DCLW (Yeh et al., ECCV 2022): SimCLR with the positive decoupled from the denominator."""

from __future__ import annotations

from torch import Tensor

from ssl_lightning.components.heads import MLPHead
from ssl_lightning.losses.dcl import dcl, dclw
from ssl_lightning.methods.ssl.base import SSLMethod


class DCL(SSLMethod):
    """Decoupled Contrastive Learning: SimCLR's architecture and recipe (2-layer projector, 2048
    hidden, 128 out; LARS, LR 0.3 per 256 images, weight decay 1e-6) with the DCL loss, which drops
    the positive pair from NT-Xent's denominator. Temperature 0.1, the paper's value.

    Args:
        temperature: softmax temperature of the loss.
        proj_hidden_dim, proj_dim: projector widths.
        **kwargs: backbone, optimizer and schedule arguments of :class:`SSLMethod`.
    """

    def __init__(self, temperature: float = 0.1, proj_hidden_dim: int = 2048, proj_dim: int = 128, **kwargs):
        super().__init__(**kwargs)  # TrainModule saves every argument in self.hparams

    def build_heads(self, feat_dim: int) -> None:
        self.projector = MLPHead(feat_dim, self.hparams.proj_hidden_dim, self.hparams.proj_dim, num_layers=2)

    def contrastive_loss(self, z1: Tensor, z2: Tensor) -> Tensor:
        """The loss of the two views' projections (DCLW changes only this)."""
        return dcl(z1, z2, self.hparams.temperature)

    def shared_step(self, batch: dict) -> dict:
        view1, view2 = batch["views"]
        feats1, feats2 = self.backbone(view1), self.backbone(view2)
        embeds = self.projector(feats1)
        loss = self.contrastive_loss(embeds, self.projector(feats2))
        return {"loss": loss, "feats": feats1, "embeds": embeds}


class DCLW(DCL):
    """DCL with the negative von Mises-Fisher weighting of the positive term (the paper's DCLW):
    pairs whose views already agree weigh less. Temperature 0.1 and sigma 0.5, the paper's values;
    otherwise as :class:`DCL`.

    Args:
        sigma: scale of the weights' softmax over the global batch's pairs.
        temperature, proj_hidden_dim, proj_dim, **kwargs: as :class:`DCL`.
    """

    def __init__(self, sigma: float = 0.5, temperature: float = 0.1, **kwargs):
        super().__init__(temperature=temperature, **kwargs)

    def contrastive_loss(self, z1: Tensor, z2: Tensor) -> Tensor:
        return dclw(z1, z2, self.hparams.temperature, self.hparams.sigma)
