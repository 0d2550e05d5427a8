"""SimSiam (Chen and He, CVPR 2021): predict the other view's projection, stop-gradient on the target,
no teacher and no negatives."""

from __future__ import annotations

from typing import Literal

from ssl_lightning.components.direct_pred import DirectPredictor, check_predictor_choice
from ssl_lightning.components.heads import MLPHead
from ssl_lightning.losses import normalized_regression
from ssl_lightning.methods.ssl.base import SSLMethod
from ssl_lightning.optim import param_groups


class SimSiam(SSLMethod):
    """SimSiam with the paper's defaults: 3-layer projector (2048 hidden, 2048 out, BN on every layer,
    the output's without affine parameters), bottleneck predictor 2048 -> 512 -> 2048, SGD with LR
    0.05 per 256 images, weight decay 1e-4, momentum 0.9, cosine schedule without warm-up, and the
    predictor's LR fixed at its peak (the paper's Table 1c, "lr not decayed"; the official code's
    ``--fix-pred-lr``). Linear layers followed by a BatchNorm have no bias, as in the official code
    (MLPHead's ``bias`` flag is all or nothing, so the predictor's hidden layer keeps a bias that its
    BatchNorm cancels: the same function).

    The loss is the paper's eq. 2, with D(p, z) = -cos(p, stopgrad(z)):

        L = 1/2 D(p1, z2) + 1/2 D(p2, z1)

    computed as ``(R(p1, z2) + R(p2, z1)) / 4 - 1`` with R = :func:`~ssl_lightning.losses.normalized_regression`
    (``2 - 2 cos``, over the global batch), which is the same value and gradient.

    ``predictor="direct_pred"`` replaces the MLP predictor with DirectPred's linear predictor set from
    the embeddings' correlation (:class:`~ssl_lightning.components.direct_pred.DirectPredictor`; Tian,
    Chen and Ganguli, ICML 2021), refreshed every ``direct_pred_freq`` optimizer steps.

    Args:
        proj_hidden_dim, proj_dim: projector widths.
        pred_hidden_dim: the MLP predictor's bottleneck; None: 512. Setting it with
            ``predictor="direct_pred"`` is an error (DirectPred's predictor is linear).
        fixed_predictor_lr: keep the predictor's LR at its peak, outside the schedule.
        predictor: "mlp" (the paper's) or "direct_pred".
        direct_pred_rho, direct_pred_eps, direct_pred_freq: DirectPred's EMA weight of the past
            correlation, eigenvalue boost, and refresh period in optimizer steps (paper: 0.3, 0.01, 1).
        **kwargs: backbone, optimizer and schedule arguments of :class:`SSLMethod`.
    """

    def __init__(
        self,
        proj_hidden_dim: int = 2048,
        proj_dim: int = 2048,
        pred_hidden_dim: int | None = None,
        fixed_predictor_lr: bool = True,
        predictor: Literal["mlp", "direct_pred"] = "mlp",
        direct_pred_rho: float = 0.3,
        direct_pred_eps: float = 0.01,
        direct_pred_freq: int = 1,
        optimizer: Literal["lars", "sgd", "adamw", "lamb", "adamp", "adam"] = "sgd",
        lr: float = 0.05,
        weight_decay: float = 1e-4,
        warmup_epochs: float = 0.0,
        **kwargs,
    ):
        check_predictor_choice(type(self).__name__, predictor, pred_hidden_dim, direct_pred_freq)
        super().__init__(optimizer=optimizer, lr=lr, weight_decay=weight_decay, warmup_epochs=warmup_epochs, **kwargs)

    @property
    def direct_pred(self) -> bool:
        return self.hparams.predictor == "direct_pred"

    def build_heads(self, feat_dim: int) -> None:
        hp = self.hparams
        self.projector = MLPHead(feat_dim, hp.proj_hidden_dim, hp.proj_dim, num_layers=3, bias=False,
                                 last_batch_norm=True)
        if self.direct_pred:
            self.predictor = DirectPredictor(hp.proj_dim, hp.direct_pred_rho, hp.direct_pred_eps)
        else:
            hidden = hp.pred_hidden_dim if hp.pred_hidden_dim is not None else 512
            self.predictor = MLPHead(hp.proj_dim, hidden, hp.proj_dim, num_layers=2)

    def parameter_groups(self) -> list[dict]:
        groups = super().parameter_groups()
        if not self.hparams.fixed_predictor_lr:
            return groups
        # The predictor leaves the student's groups for its own, which the schedule leaves at its peak.
        predictor_params = {id(p) for p in self.predictor.parameters()}
        for group in groups:
            group["params"] = [p for p in group["params"] if id(p) not in predictor_params]
        fixed = [{**group, "name": f"predictor_{group['name']}", "fixed_lr": True}
                 for group in param_groups(self.predictor, self.hparams.weight_decay)]
        return [group for group in groups if group["params"]] + fixed

    def shared_step(self, batch: dict) -> dict:
        view1, view2 = batch["views"]
        feats1, feats2 = self.backbone(view1), self.backbone(view2)
        z1, z2 = self.projector(feats1), self.projector(feats2)
        if self.direct_pred:
            self.predictor.observe(z1, z2)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        # -cos = (2 - 2 cos) / 2 - 1: the paper's symmetrised D from the tested regression loss.
        loss = (normalized_regression(p1, z2.detach()) + normalized_regression(p2, z1.detach())) / 4 - 1
        return {"loss": loss, "feats": feats1, "embeds": z1}

    def on_optimizer_step(self, step: int) -> None:
        if self.direct_pred and step % self.hparams.direct_pred_freq == 0:
            self.predictor.refresh()

