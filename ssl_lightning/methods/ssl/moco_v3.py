"""MoCo v3 (Chen, Xie and He, ICCV 2021): predict a momentum encoder's keys of the other view,
contrasted against the other keys of the global batch (no queue)."""

from __future__ import annotations

from torch import nn

from ssl_lightning.components.heads import MLPHead
from ssl_lightning.components.teacher import EMATeacher
from ssl_lightning.core.step_logging import logger_writes_this_step
from ssl_lightning.losses.batch_info_nce import batch_info_nce
from ssl_lightning.methods.ssl.base import SSLMethod


class MoCoV3(SSLMethod):
    """MoCo v3 with the official code's ResNet-50 defaults (facebookresearch/moco-v3,
    ``main_moco.py``; the 100-epoch recipe): temperature 1.0, momentum 0.99 rising to 1 on a cosine
    schedule (``--moco-m-cos``), projector and predictor 4096 hidden / 256 out, LARS with LR 0.6 per
    256 images, weight decay 1e-6, 10 warm-up epochs. The official 300- and 1000-epoch ResNet
    recipes use LR 0.3 (and weight decay 1.5e-6, momentum 0.996 at 1000 epochs); its ViT recipe is
    AdamW, LR 1.5e-4 per 256, weight decay 0.1, 40 warm-up epochs, temperature 0.2 and
    ``freeze_patch_embed=True``.

    The loss is symmetrised and scaled by 2t as in the official code:
    ``2t * (L(q1, k2) + L(q2, k1))`` with L :func:`~ssl_lightning.losses.batch_info_nce.batch_info_nce`,
    q the predictor's outputs and k the momentum encoder's projections.

    Heads follow the official code: linear layers without bias; the projector ends in a BatchNorm
    without affine parameters; it has 2 layers on a ResNet and 3 on a ViT, whose predictor also ends
    in that BatchNorm (the ResNet's predictor does not).

    Args:
        temperature: softmax temperature (1.0 for ResNets, 0.2 for ViTs).
        base_momentum, final_momentum: EMA momentum of the momentum encoder at the first and last step.
        proj_hidden_dim, proj_dim, pred_hidden_dim: head widths.
        proj_num_layers: projector depth; None: the official choice, 3 for a ViT (a backbone with
            ``patch_embed``), 2 otherwise.
        pred_last_batch_norm: end the predictor in an affine-free BatchNorm; None: the official
            choice, on for a ViT, off otherwise.
        freeze_patch_embed: keep a timm ViT's patch embedding at its random initialisation (the
            paper's "random patch projection", ``--stop-grad-conv1``), which stabilises ViT training.
        **kwargs: backbone, optimizer and schedule arguments of :class:`SSLMethod`.
    """

    def __init__(
        self,
        temperature: float = 1.0,
        base_momentum: float = 0.99,
        final_momentum: float = 1.0,
        proj_hidden_dim: int = 4096,
        proj_dim: int = 256,
        pred_hidden_dim: int = 4096,
        proj_num_layers: int | None = None,
        pred_last_batch_norm: bool | None = None,
        freeze_patch_embed: bool = False,
        lr: float = 0.6,
        weight_decay: float = 1e-6,
        **kwargs,
    ):
        super().__init__(lr=lr, weight_decay=weight_decay, **kwargs)

    def build_heads(self, feat_dim: int) -> None:
        hp = self.hparams
        is_vit = hasattr(self.backbone, "patch_embed")
        if hp.freeze_patch_embed:
            self._freeze_patch_embed()
        proj_layers = hp.proj_num_layers if hp.proj_num_layers is not None else (3 if is_vit else 2)
        pred_last_bn = hp.pred_last_batch_norm if hp.pred_last_batch_norm is not None else is_vit
        self.projector = MLPHead(feat_dim, hp.proj_hidden_dim, hp.proj_dim, num_layers=proj_layers, bias=False,
                                 last_batch_norm=True)
        self.predictor = MLPHead(hp.proj_dim, hp.pred_hidden_dim, hp.proj_dim, num_layers=2, bias=False,
                                 last_batch_norm=pred_last_bn)
        self.teacher = EMATeacher(self._online_network(), hp.base_momentum, hp.final_momentum)

    def _freeze_patch_embed(self) -> None:
        patch_embed = getattr(self.backbone, "patch_embed", None)
        if not isinstance(patch_embed, nn.Module):
            raise ValueError(
                f"MoCoV3(freeze_patch_embed=True) needs a ViT backbone with a `patch_embed` module (a timm "
                f"VisionTransformer), but {type(self.backbone).__name__} has none. Use a ViT backbone, or set "
                "freeze_patch_embed to false."
            )
        # Frozen parameters drop out of the optimizer's groups (ssl_lightning.optim.param_groups).
        patch_embed.requires_grad_(False)

    def _online_network(self) -> nn.Module:
        # The part of the student the momentum encoder mirrors (the predictor has no counterpart).
        return nn.Sequential(self.backbone, self.projector)

    def shared_step(self, batch: dict) -> dict:
        view1, view2 = batch["views"]
        feats1, feats2 = self.backbone(view1), self.backbone(view2)
        embeds = self.projector(feats1)
        query1, query2 = self.predictor(embeds), self.predictor(self.projector(feats2))
        key1, key2 = self.teacher(view1), self.teacher(view2)
        t = self.hparams.temperature
        loss = 2 * t * (batch_info_nce(query1, key2, t) + batch_info_nce(query2, key1, t))
        return {"loss": loss, "feats": feats1, "embeds": embeds}

    def on_optimizer_step(self, step: int) -> None:
        momentum = self.teacher.momentum(step, int(self.trainer.estimated_stepping_batches))
        self.teacher.update(self._online_network(), momentum)
        if logger_writes_this_step(self.trainer):
            self.log("momentum", momentum, batch_size=1)
