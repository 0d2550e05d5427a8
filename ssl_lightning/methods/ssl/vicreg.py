"""VICReg (Bardes, Ponce and LeCun, ICLR 2022): variance, invariance and covariance regularisation."""

from __future__ import annotations

from ssl_lightning.components.heads import MLPHead
from ssl_lightning.losses.vicreg import vicreg
from ssl_lightning.methods.ssl.base import SSLMethod


class VICReg(SSLMethod):
    """VICReg with the paper's defaults: 3-layer expander 8192-8192-8192, loss weights 25 / 25 / 1
    (invariance / variance / covariance), LARS with LR 0.2 per 256 images, weight decay 1e-6, 10
    warm-up epochs and a cosine decay to 1e-3 of the peak (official main_vicreg.py).

    The expander's biases are left out: every hidden Linear is followed by BatchNorm and the loss
    centres the output, so a bias would receive no gradient.

    Args:
        sim_weight, var_weight, cov_weight: weights of the invariance, variance and covariance terms.
        proj_hidden_dim, proj_dim: expander widths.
        **kwargs: backbone, optimizer and schedule arguments of :class:`SSLMethod`.
    """

    def __init__(
        self,
        sim_weight: float = 25.0,
        var_weight: float = 25.0,
        cov_weight: float = 1.0,
        proj_hidden_dim: int = 8192,
        proj_dim: int = 8192,
        lr: float = 0.2,
        weight_decay: float = 1e-6,
        min_lr_ratio: float = 1e-3,
        **kwargs,
    ):
        super().__init__(lr=lr, weight_decay=weight_decay, min_lr_ratio=min_lr_ratio, **kwargs)
        self.sim_weight = sim_weight
        self.var_weight = var_weight
        self.cov_weight = cov_weight
        self.proj_hidden_dim = proj_hidden_dim
        self.proj_dim = proj_dim

    def build_heads(self, feat_dim: int) -> None:
        self.projector = MLPHead(feat_dim, self.proj_hidden_dim, self.proj_dim, num_layers=3, bias=False)

    def shared_step(self, batch: dict) -> dict:
        view1, view2 = batch["views"]
        feats1, feats2 = self.backbone(view1), self.backbone(view2)
        embeds = self.projector(feats1)
        terms = vicreg(embeds, self.projector(feats2), self.sim_weight, self.var_weight, self.cov_weight)
        return {
            "loss": terms.loss,
            "loss/invariance": terms.invariance.detach(),
            "loss/variance": terms.variance.detach(),
            "loss/covariance": terms.covariance.detach(),
            "feats": feats1,
            "embeds": embeds,
        }
