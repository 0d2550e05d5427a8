"""MYOW (Azabou et al. 2021, "Mine Your Own vieW"): BYOL plus an across-sample prediction of a
mined neighbour's target projection."""

from __future__ import annotations

import torch
from torch import nn

from ssl_lightning.components.heads import MLPHead
from ssl_lightning.components.teacher import EMATeacher
from ssl_lightning.core.optimization import resolve_warmup_steps
from ssl_lightning.core.step_logging import logger_writes_this_step
from ssl_lightning.losses.byol import normalized_regression
from ssl_lightning.losses.myow import mined_view_loss
from ssl_lightning.methods.ssl.byol import BYOL


def mined_loss_weight(step: int, warmup_steps: int, rampup_end_step: int, max_weight: float) -> float:
    """The official ``MYOWTrainer.update_mined_loss_weight``: 0 before ``warmup_steps``, then a linear
    ramp that reaches ``max_weight`` at ``rampup_end_step`` (the ramp's end, counted from step 0)."""
    if step < warmup_steps:
        return 0.0
    if step >= rampup_end_step:
        return max_weight
    return max_weight * (step - warmup_steps) / (rampup_end_step - warmup_steps)


class _Cascade(nn.Module):
    """backbone -> projector -> projector_m, returning all three outputs: the teacher's pass gives
    the mining keys, the BYOL targets and the mined-view targets at once."""

    def __init__(self, backbone: nn.Module, projector: nn.Module, projector_m: nn.Module):
        super().__init__()
        self.backbone, self.projector, self.projector_m = backbone, projector, projector_m

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feats = self.backbone(images)
        proj = self.projector(feats)
        return feats, proj, self.projector_m(proj)


class MYOW(BYOL):
    """MYOW with the official code's CIFAR-10 settings (github.com/nerdslab/myow,
    ``scripts/cifar-train.py``): BYOL's projector and predictor (4096 hidden, 256 out), a second
    cascaded projector ``projector_m`` and predictor ``predictor_m`` (1024 hidden, 64 out), one
    neighbour (``view_miner_k=1``), and a mined-loss weight ``w`` that is 0 for 100 epochs and
    rises linearly to 1.0 at epoch 110. Target momentum and optimizer default to BYOL's (the
    official CIFAR run: momentum 0.98, SGD LR 2.0, weight decay 5e-5, see configs/cifar10/myow.yaml).

    Each step, with L the normalised regression of BYOL,

        loss = ( (L(q1, z2') + L(q2, z1')) / 2 + w * L_m ) / (1 + w)

    as the official trainer weights its terms, where L_m
    (:func:`~ssl_lightning.losses.myow.mined_view_loss`) makes view 1's online prediction
    ``predictor_m(projector_m(projector(y1)))`` regress the target's ``projector_m(projector(y'))``
    of a neighbour mined by the online representation y1 among the target representations of view 2
    of the other images of the global batch.

    Departures from the official code, which draws the anchor and the pool as two extra, mildly
    augmented views (crop 0.8-1, flip) of a second pass over the same shuffled loader: the anchors
    are view 1 and the pool is the teacher's view 2 of the same global batch (no third view and no
    second loader), and each image's own view is masked out of its pool, so the mined view is
    always another image (the official pool holds the anchor's own image). The mined term is
    computed every step, also while ``w`` is 0, so that the logged terms and the parameters that
    take part are the same every step (DDP). With ``w = 0`` the loss is half of :class:`BYOL`'s.

    Args:
        mined_k: neighbours a mined view is drawn from (the official ``view_miner_k``).
        mined_proj_hidden_dim, mined_proj_dim: widths of ``projector_m`` and ``predictor_m``.
        myow_warmup_epochs: epochs with weight 0.
        myow_rampup_epochs: epoch at which the weight reaches ``myow_max_weight`` (the ramp's end,
            counted from the start, as the official ``myow_rampup_epochs``).
        myow_max_weight: the final weight ``w`` of the mined-view loss.
        **kwargs: :class:`BYOL`'s arguments (momentum, head widths, backbone, optimizer, schedule).
    """

    def __init__(
        self,
        mined_k: int = 1,
        mined_proj_hidden_dim: int = 1024,
        mined_proj_dim: int = 64,
        myow_warmup_epochs: float = 100.0,
        myow_rampup_epochs: float = 110.0,
        myow_max_weight: float = 1.0,
        **kwargs,
    ):
        if mined_k < 1:
            raise ValueError(f"MYOW needs mined_k >= 1 (neighbours to draw a mined view from), got {mined_k}.")
        if not 0 <= myow_warmup_epochs <= myow_rampup_epochs:
            raise ValueError(
                f"MYOW needs 0 <= myow_warmup_epochs <= myow_rampup_epochs (the ramp ends at myow_rampup_epochs, "
                f"counted from the start), got {myow_warmup_epochs} and {myow_rampup_epochs}."
            )
        if myow_max_weight < 0:
            raise ValueError(f"MYOW needs myow_max_weight >= 0, got {myow_max_weight}.")
        if kwargs.get("predictor", "mlp") != "mlp":
            raise ValueError(f"MYOW trains MLP predictors (BYOL's and predictor_m); predictor={kwargs['predictor']!r} "
                             "is a BYOL option only: leave predictor at 'mlp'.")
        super().__init__(**kwargs)
        self.warmup_steps, self.rampup_end_step = 0, 0  # in optimizer steps, set at on_train_start

    def build_heads(self, feat_dim: int) -> None:
        hp = self.hparams
        self.projector = MLPHead(feat_dim, self.proj_hidden_dim, self.proj_dim)
        self.predictor = MLPHead(self.proj_dim, self.pred_hidden_dim, self.proj_dim)
        self.projector_m = MLPHead(self.proj_dim, hp.mined_proj_hidden_dim, hp.mined_proj_dim)
        self.predictor_m = MLPHead(hp.mined_proj_dim, hp.mined_proj_hidden_dim, hp.mined_proj_dim)
        self.teacher = EMATeacher(self._online_network(), self.base_momentum, self.final_momentum)

    def _online_network(self) -> nn.Module:
        # What the teacher mirrors: both projectors (the predictors have no teacher counterpart).
        return _Cascade(self.backbone, self.projector, self.projector_m)

    def on_train_start(self) -> None:
        super().on_train_start()
        total = int(self.trainer.estimated_stepping_batches)
        self.warmup_steps = resolve_warmup_steps(self.hparams.myow_warmup_epochs, None, self.trainer, total)
        self.rampup_end_step = resolve_warmup_steps(self.hparams.myow_rampup_epochs, None, self.trainer, total)

    def mined_weight(self, step: int) -> float:
        return mined_loss_weight(step, self.warmup_steps, self.rampup_end_step, self.hparams.myow_max_weight)

    def shared_step(self, batch: dict) -> dict:
        view1, view2 = batch["views"]
        feats1, feats2 = self.backbone(view1), self.backbone(view2)
        proj1, proj2 = self.projector(feats1), self.projector(feats2)
        pred1, pred2 = self.predictor(proj1), self.predictor(proj2)
        _, target1, _ = self.teacher(view1)
        target_feats2, target2, target_m2 = self.teacher(view2)
        byol = (normalized_regression(pred1, target2) + normalized_regression(pred2, target1)) / 2

        pred_m1 = self.predictor_m(self.projector_m(proj1))
        mined = mined_view_loss(pred_m1, feats1, target_feats2, target_m2, self.hparams.mined_k)
        weight = self.mined_weight(self.global_step)
        loss = (byol + weight * mined) / (1 + weight)
        return {"loss": loss, "feats": feats1, "loss/byol": byol, "loss/mined": mined, "embeds": proj1}

    def on_optimizer_step(self, step: int) -> None:
        super().on_optimizer_step(step)
        if logger_writes_this_step(self.trainer):
            self.log("myow_weight", self.mined_weight(step), batch_size=1)
