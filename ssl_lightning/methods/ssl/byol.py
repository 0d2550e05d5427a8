"""BYOL (Grill et al., NeurIPS 2020): predict an EMA teacher's projection of the other view."""

from __future__ import annotations

from typing import Literal

from torch import nn

from ssl_lightning.components.direct_pred import DirectPredictor, check_predictor_choice
from ssl_lightning.components.heads import MLPHead
from ssl_lightning.components.teacher import EMATeacher
from ssl_lightning.core.step_logging import logger_writes_this_step
from ssl_lightning.losses import normalized_regression
from ssl_lightning.methods.ssl.base import SSLMethod


class BYOL(SSLMethod):
    """BYOL with the paper's defaults: projector and predictor 4096 hidden / 256 out, target
    momentum 0.996 rising to 1 on a cosine schedule, LARS with LR 0.2 per 256 images and weight
    decay 1.5e-6. The loss is symmetrised: ``L(p1, z2') + L(p2, z1')``.

    ``predictor="direct_pred"`` replaces the MLP predictor with DirectPred's linear predictor set from
    the online embeddings' correlation (:class:`~ssl_lightning.components.direct_pred.DirectPredictor`;
    Tian, Chen and Ganguli, ICML 2021, whose defaults are rho 0.3, eps 0.01, a refresh every step).

    Args:
        base_momentum, final_momentum: EMA momentum of the target network at the first and last step.
        proj_hidden_dim, proj_dim: projector widths.
        pred_hidden_dim: the MLP predictor's hidden width; None: 4096. Setting it with
            ``predictor="direct_pred"`` is an error (DirectPred's predictor is linear).
        predictor: "mlp" (the paper's) or "direct_pred".
        direct_pred_rho, direct_pred_eps, direct_pred_freq: DirectPred's EMA weight of the past
            correlation, eigenvalue boost, and refresh period in optimizer steps.
        **kwargs: backbone, optimizer and schedule arguments of :class:`SSLMethod`.
    """

    def __init__(
        self,
        base_momentum: float = 0.996,
        final_momentum: float = 1.0,
        proj_hidden_dim: int = 4096,
        proj_dim: int = 256,
        pred_hidden_dim: int | None = None,
        predictor: Literal["mlp", "direct_pred"] = "mlp",
        direct_pred_rho: float = 0.3,
        direct_pred_eps: float = 0.01,
        direct_pred_freq: int = 1,
        lr: float = 0.2,
        weight_decay: float = 1.5e-6,
        **kwargs,
    ):
        check_predictor_choice(type(self).__name__, predictor, pred_hidden_dim, direct_pred_freq)
        super().__init__(lr=lr, weight_decay=weight_decay, **kwargs)
        self.base_momentum = base_momentum
        self.final_momentum = final_momentum
        self.proj_hidden_dim = proj_hidden_dim
        self.proj_dim = proj_dim
        self.pred_hidden_dim = pred_hidden_dim if pred_hidden_dim is not None else 4096
        self.direct_pred = predictor == "direct_pred"

    def build_heads(self, feat_dim: int) -> None:
        self.projector = MLPHead(feat_dim, self.proj_hidden_dim, self.proj_dim)
        if self.direct_pred:
            hp = self.hparams
            self.predictor = DirectPredictor(self.proj_dim, hp.direct_pred_rho, hp.direct_pred_eps)
        else:
            self.predictor = MLPHead(self.proj_dim, self.pred_hidden_dim, self.proj_dim)
        self.teacher = EMATeacher(self._online_network(), self.base_momentum, self.final_momentum)

    def _online_network(self) -> nn.Module:
        # The part of the student the teacher mirrors (the predictor has no teacher counterpart).
        return nn.Sequential(self.backbone, self.projector)

    def shared_step(self, batch: dict) -> dict:
        view1, view2 = batch["views"]
        feats1, feats2 = self.backbone(view1), self.backbone(view2)
        proj1, proj2 = self.projector(feats1), self.projector(feats2)
        if self.direct_pred:
            self.predictor.observe(proj1, proj2)
        pred1, pred2 = self.predictor(proj1), self.predictor(proj2)
        target1, target2 = self.teacher(view1), self.teacher(view2)
        loss = normalized_regression(pred1, target2) + normalized_regression(pred2, target1)
        return {"loss": loss, "feats": feats1, "embeds": proj1}

    def on_optimizer_step(self, step: int) -> None:
        momentum = self.teacher.momentum(step, int(self.trainer.estimated_stepping_batches))
        self.teacher.update(self._online_network(), momentum)
        if self.direct_pred and step % self.hparams.direct_pred_freq == 0:
            self.predictor.refresh()
        if logger_writes_this_step(self.trainer):
            self.log("momentum", momentum, batch_size=1)
