"""lightly's implementation of our overlapping methods, for the benchmarks (never a dependency of ssl_lightning).

Install it beside ssl_lightning to run them (tested with lightly 1.6.0):

    pip install lightly
    python benchmarks/cifar10_knn.py --implementation both --methods SimCLR BYOL

Each adapter subclasses our method, so the backbone, the data and views, the optimizer with its LR
scaling, schedule and parameter groups, the online probe, logging and the budget are ours; it replaces
only the heads and the loss (and the momentum encoder, queue or memory bank where the method has
one) with lightly's ``lightly.loss`` / ``lightly.models.modules`` / ``lightly.models.utils``, wired as
lightly's own examples (``examples/pytorch_lightning/<method>.py``) and ImageNet benchmarks
(``benchmarks/imagenet/resnet50/<method>.py``) wire them. Every hyperparameter comes from our
recipe's hparams (the same constructor), so only the implementation differs. The heads keep our
attribute names (``projector``, ``predictor``, ``prototypes``) so that ``embed`` and SimSiam's
fixed-LR predictor group find them.

Where lightly differs from ours, a comment says how (the lead's RESULTS.md lists them). Common to all:
lightly's losses run under autocast when the Trainer does (ours switch it off); its memory banks are
non-persistent buffers (not in a checkpoint, so no exact resume) that read their pointer on the host;
its momentum encoders are deep copies moved by ``update_momentum`` (parameters only: BatchNorm running
statistics follow the teacher's own forward passes, not an EMA; training outputs are the same, as
both normalise with batch statistics), updated at the top of the training step with
``cosine_schedule`` over ``estimated_stepping_batches`` (ours: after each optimizer step,
``cosine_momentum``; the two schedules differ by one step in their denominator); its heads put no bias
on a Linear followed by BatchNorm. The teacher-student methods (DINO, iBOT) take lightly's machinery from its
ImageNet ViT benchmarks (``benchmarks/imagenet/vitb16/{dino,ibot,dinov2}.py``), MAE from ``vitb16/mae.py``; the
ViT-only ones (iBOT, MAE) wrap our timm ViT in lightly's ``MaskedVisionTransformerTIMM``. lightly has no
Random Teachers (no counterpart). Their differences from ours are in each class's docstring.

    python benchmarks/lightly_counterparts.py   # loss finite and backbone gradient, every adapter, tiny model
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

try:
    from lightly.loss import (
        BarlowTwinsLoss,
        DCLLoss,
        DCLWLoss,
        DINOLoss,
        IBOTPatchLoss,
        KoLeoLoss,
        NegativeCosineSimilarity,
        NTXentLoss,
        SwaVLoss,
        VICRegLoss,
    )
    from lightly.models.modules import MaskedVisionTransformerDecoderTIMM, MaskedVisionTransformerTIMM
    from lightly.models.modules.heads import (
        BarlowTwinsProjectionHead,
        BYOLPredictionHead,
        BYOLProjectionHead,
        DINOProjectionHead,
        MoCoProjectionHead,
        NNCLRPredictionHead,
        NNCLRProjectionHead,
        SimCLRProjectionHead,
        SimSiamPredictionHead,
        SimSiamProjectionHead,
        SwaVProjectionHead,
        SwaVPrototypes,
        VICRegProjectionHead,
    )
    from lightly.models.modules.masked_vision_transformer_timm import init_weights
    from lightly.models.modules.memory_bank import MemoryBankModule
    from lightly.models.modules.nn_memory_bank import NNMemoryBankModule
    from lightly.models.utils import (
        deactivate_requires_grad,
        get_at_index,
        normalize_mean_var,
        patchify,
        random_block_mask,
        random_token_mask,
        set_at_index,
        update_momentum,
    )
    from lightly.utils.scheduler import cosine_schedule
except ModuleNotFoundError as error:
    raise ModuleNotFoundError(
        "benchmarks/lightly_counterparts.py needs lightly, which ssl_lightning does not depend on (benchmarks "
        f"only): `pip install lightly` (tested with 1.6.0). Import failed with: {error}"
    ) from error

from timm.models.vision_transformer import VisionTransformer

from ssl_lightning.components.masking import check_patch_tokens
from ssl_lightning.methods import (
    BYOL,
    DCL,
    DCLW,
    DINO,
    IBOT,
    MAE,
    NNCLR,
    BarlowTwins,
    MoCoV2,
    MoCoV3,
    SimCLR,
    SimSiam,
    SwAV,
    VICReg,
)
from ssl_lightning.methods.ssl.base import SSLMethod
from ssl_lightning.methods.ssl.swav import NUM_ASSIGNED_CROPS


class _TwoViewLoss:
    """lightly's two-view examples: backbone and projection head per view, then ``criterion(z0, z1)``."""

    def shared_step(self, batch: dict) -> dict:
        view1, view2 = batch["views"]
        feats1 = self.backbone(view1)
        loss = self.criterion(self.projector(feats1), self.projector(self.backbone(view2)))
        return {"loss": loss, "feats": feats1}


class _MomentumEncoder:
    """lightly's momentum encoder: deep copies of backbone and projection head, frozen with
    ``deactivate_requires_grad`` and moved by ``update_momentum`` inside the training step."""

    def _copy_momentum_encoder(self) -> None:
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projector)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)

    def _update_momentum(self) -> None:
        hp = self.hparams  # lightly's per-step cosine, as its ImageNet BYOL benchmark
        m = cosine_schedule(self.trainer.global_step, int(self.trainer.estimated_stepping_batches),
                            hp.base_momentum, hp.final_momentum)
        update_momentum(self.backbone, self.backbone_momentum, m=m)
        update_momentum(self.projector, self.projection_head_momentum, m=m)

    @torch.no_grad()
    def _forward_momentum(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection_head_momentum(self.backbone_momentum(x)).detach()

    def on_optimizer_step(self, step: int) -> None:
        """lightly moves the momentum encoder in the training step, not after the optimizer step."""


def _refuse_direct_pred(model: SSLMethod) -> None:
    if model.hparams.get("predictor", "mlp") != "mlp":
        raise ValueError(f"lightly has no DirectPred predictor: run {type(model).__name__} with predictor='mlp'")


class LightlySimCLR(_TwoViewLoss, SimCLR):
    def build_heads(self, feat_dim: int) -> None:
        hp = self.hparams
        # lightly's default SimCLR head also batch-normalises its output (affine BN); ours ends in a Linear.
        self.projector = SimCLRProjectionHead(feat_dim, hp.proj_hidden_dim, hp.proj_dim)
        self.criterion = NTXentLoss(temperature=hp.temperature)  # the same loss as ours on one process


class LightlyDCL(_TwoViewLoss, DCL):
    def build_heads(self, feat_dim: int) -> None:
        hp = self.hparams  # SimCLRProjectionHead as lightly's DCL example (output BN, as LightlySimCLR)
        self.projector = SimCLRProjectionHead(feat_dim, hp.proj_hidden_dim, hp.proj_dim)
        # Mean over both directions (0.5 * (loss0 + loss1)): our normalisation too.
        self.criterion = DCLLoss(temperature=hp.temperature)


class LightlyDCLW(_TwoViewLoss, DCLW):
    def build_heads(self, feat_dim: int) -> None:
        hp = self.hparams
        self.projector = SimCLRProjectionHead(feat_dim, hp.proj_hidden_dim, hp.proj_dim)
        self.criterion = DCLWLoss(temperature=hp.temperature, sigma=hp.sigma)  # weights detached, as ours


class LightlyBarlowTwins(_TwoViewLoss, BarlowTwins):
    def build_heads(self, feat_dim: int) -> None:
        hp = self.hparams
        # The last Linear has a bias (ours none); the standardised loss gives it no gradient.
        self.projector = BarlowTwinsProjectionHead(feat_dim, hp.proj_hidden_dim, hp.proj_dim)
        self.criterion = BarlowTwinsLoss(lambda_param=hp.lambda_offdiag)  # BN-standardised (eps 1e-5), as ours

    def shared_step(self, batch: dict) -> dict:
        out = super().shared_step(batch)
        return {**out, "loss": self.hparams.loss_scale * out["loss"]}  # the recipe's scale (solo-learn's 0.1)


class LightlyVICReg(_TwoViewLoss, VICReg):
    def build_heads(self, feat_dim: int) -> None:
        hp = self.hparams
        # The last Linear has a bias (ours none; the loss gives it no gradient). No per-term logs.
        self.projector = VICRegProjectionHead(feat_dim, hp.proj_hidden_dim, hp.proj_dim, num_layers=3)
        self.criterion = VICRegLoss(lambda_param=hp.sim_weight, mu_param=hp.var_weight, nu_param=hp.cov_weight)


class LightlySimSiam(SimSiam):
    def build_heads(self, feat_dim: int) -> None:
        _refuse_direct_pred(self)
        hp = self.hparams  # the same architecture as ours (3 layers, affine-free output BN; 2048-512-2048)
        self.projector = SimSiamProjectionHead(feat_dim, hp.proj_hidden_dim, hp.proj_dim)
        hidden = hp.pred_hidden_dim if hp.pred_hidden_dim is not None else 512
        self.predictor = SimSiamPredictionHead(hp.proj_dim, hidden, hp.proj_dim)  # our fixed-LR group finds it
        self.criterion = NegativeCosineSimilarity()

    def shared_step(self, batch: dict) -> dict:
        view1, view2 = batch["views"]
        feats1 = self.backbone(view1)
        z1, z2 = self.projector(feats1), self.projector(self.backbone(view2))
        p1, p2 = self.predictor(z1), self.predictor(z2)
        loss = 0.5 * (self.criterion(z1.detach(), p2) + self.criterion(z2.detach(), p1))
        return {"loss": loss, "feats": feats1}


class LightlyBYOL(_MomentumEncoder, BYOL):
    def build_heads(self, feat_dim: int) -> None:
        _refuse_direct_pred(self)
        hp = self.hparams
        self.projector = BYOLProjectionHead(feat_dim, hp.proj_hidden_dim, hp.proj_dim)
        self.predictor = BYOLPredictionHead(hp.proj_dim, self.pred_hidden_dim, hp.proj_dim)
        self._copy_momentum_encoder()  # as lightly's example (its ImageNet benchmark re-initialises the head)
        self.criterion = NegativeCosineSimilarity()

    def shared_step(self, batch: dict) -> dict:
        self._update_momentum()
        view1, view2 = batch["views"]
        feats1 = self.backbone(view1)
        p1 = self.predictor(self.projector(feats1))
        p2 = self.predictor(self.projector(self.backbone(view2)))
        t1, t2 = self._forward_momentum(view1), self._forward_momentum(view2)
        # lightly's ImageNet benchmark: 2 * (-cos) per direction, summed: ours minus the constant 4.
        loss = 2 * self.criterion(t1, p2) + 2 * self.criterion(t2, p1)
        return {"loss": loss, "feats": feats1}


class LightlyMoCoV2(_MomentumEncoder, MoCoV2):
    def build_heads(self, feat_dim: int) -> None:
        hp = self.hparams
        # MoCo v2's head without BatchNorm (lightly's default); ours has BN in the hidden layer.
        self.projector = MoCoProjectionHead(feat_dim, hp.proj_hidden_dim, hp.proj_dim)
        self._copy_momentum_encoder()
        # NTXentLoss with a memory bank is MoCo's InfoNCE; it queues its key input after reading the bank.
        # lightly has no symmetric MoCo: one loss (so one bank) per key view, as our per-view queue (one shared
        # bank would give the second direction this batch's other-view keys as negatives).
        bank = (hp.queue_size, hp.proj_dim)
        self.criteria = nn.ModuleList(NTXentLoss(hp.temperature, memory_bank_size=bank) for _ in range(self.key_views))

    def on_fit_start(self) -> None:
        SSLMethod.on_fit_start(self)  # lightly checks no queue size (a size the batch does not divide drops keys)

    def shared_step(self, batch: dict) -> dict:
        view1, view2 = batch["views"]
        feats1 = self.backbone(view1)
        query1 = self.projector(feats1)
        query2 = self.projector(self.backbone(view2)) if self.hparams.symmetric else None
        # lightly's ImageNet MoCo v2 (and the official code): update between query and key encoding. Its
        # batch_shuffle is left out: on one device it permutes the batch, which changes no BN statistic,
        # and the recipe's SyncBN serves several devices in both rows.
        self._update_momentum()
        key2 = self._forward_momentum(view2)
        if not self.hparams.symmetric:
            return {"loss": self.criteria[0](query1, key2), "feats": feats1}
        key1 = self._forward_momentum(view1)
        loss = (self.criteria[1](query1, key2) + self.criteria[0](query2, key1)) / 2
        return {"loss": loss, "feats": feats1}


class LightlyMoCoV3(_MomentumEncoder, MoCoV3):
    """lightly has no MoCo v3 example: its MoCoProjectionHead with ``batch_norm=True`` (the head its
    docstring gives for v3), BYOLPredictionHead (MoCo v3's ResNet predictor shape) and NTXentLoss."""

    def build_heads(self, feat_dim: int) -> None:
        hp = self.hparams
        is_vit = hasattr(self.backbone, "patch_embed")
        if hp.pred_last_batch_norm or (hp.pred_last_batch_norm is None and is_vit):
            raise ValueError("lightly has no predictor ending in BatchNorm (MoCo v3's ViT one): use a ResNet")
        if hp.freeze_patch_embed:
            self._freeze_patch_embed()
        layers = hp.proj_num_layers if hp.proj_num_layers is not None else (3 if is_vit else 2)
        # Output BN affine (ours and the official code: affine-free); the predictor's last Linear has a bias.
        self.projector = MoCoProjectionHead(feat_dim, hp.proj_hidden_dim, hp.proj_dim, num_layers=layers,
                                            batch_norm=True)
        self.predictor = BYOLPredictionHead(hp.proj_dim, hp.pred_hidden_dim, hp.proj_dim)
        self._copy_momentum_encoder()
        self.criterion = NTXentLoss(temperature=hp.temperature)

    def shared_step(self, batch: dict) -> dict:
        self._update_momentum()
        view1, view2 = batch["views"]
        feats1 = self.backbone(view1)
        q1 = self.predictor(self.projector(feats1))
        q2 = self.predictor(self.projector(self.backbone(view2)))
        k1, k2 = self._forward_momentum(view1), self._forward_momentum(view2)
        # NT-Xent, not MoCo v3's InfoNCE: the keys are anchors too (their rows send gradient to the queries),
        # and queries of one view are each other's negatives (as are keys). The 2t scale is the recipe's.
        t = self.hparams.temperature
        loss = 2 * t * (self.criterion(q1, k2) + self.criterion(q2, k1))
        return {"loss": loss, "feats": feats1}


class LightlyNNCLR(NNCLR):
    def build_heads(self, feat_dim: int) -> None:
        hp = self.hparams
        # 3 layers, output BN with affine parameters (ours: affine-free).
        self.projector = NNCLRProjectionHead(feat_dim, hp.proj_hidden_dim, hp.proj_dim)
        self.predictor = NNCLRPredictionHead(hp.proj_dim, hp.pred_hidden_dim, hp.proj_dim)
        # Queues the raw (unnormalised) projections of view 2 (ours: normalised, view 1).
        self.memory_bank = NNMemoryBankModule(size=(hp.queue_size, hp.proj_dim))
        self.criterion = NTXentLoss(temperature=hp.temperature)

    def on_fit_start(self) -> None:
        SSLMethod.on_fit_start(self)  # lightly checks no bank size

    def shared_step(self, batch: dict) -> dict:
        view1, view2 = batch["views"]
        feats1 = self.backbone(view1)
        z1, z2 = self.projector(feats1), self.projector(self.backbone(view2))
        p1, p2 = self.predictor(z1), self.predictor(z2)
        nn1 = self.memory_bank(z1.detach(), update=False)
        nn2 = self.memory_bank(z2.detach(), update=True)  # both look-ups read the bank before this batch
        # NT-Xent (both directions, neighbours and predictions each other's negatives too) where ours scores
        # each neighbour against the batch's predictions only.
        loss = 0.5 * (self.criterion(nn1, p2) + self.criterion(nn2, p1))
        return {"loss": loss, "feats": feats1}


class LightlySwAV(SwAV):
    def build_heads(self, feat_dim: int) -> None:
        hp = self.hparams
        self.projector = SwaVProjectionHead(feat_dim, hp.proj_hidden_dim, hp.proj_dim)
        # A Linear with bias (ours: bias-free cosine scores); frozen by switching requires_grad off while
        # the step passed (the epoch, as lightly's benchmark) is below n_steps_frozen_prototypes.
        self.prototypes = SwaVPrototypes(hp.proj_dim, hp.num_prototypes,
                                         n_steps_frozen_prototypes=hp.freeze_prototypes_epochs)
        # One bank per global crop, filled from the first step and used from epoch_queue_starts
        # (lightly's swav_queue.py example).
        self.queues = (nn.ModuleList(MemoryBankModule(size=(hp.queue_size, hp.proj_dim))
                                     for _ in range(NUM_ASSIGNED_CROPS)) if hp.queue_size else None)
        self.criterion = SwaVLoss(hp.temperature, hp.sinkhorn_iterations, hp.epsilon)

    # lightly normalises the prototypes in the step and freezes them itself: skip our SwAV's hooks.
    def on_fit_start(self) -> None:
        SSLMethod.on_fit_start(self)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        SSLMethod.on_train_batch_start(self, batch, batch_idx)

    def on_before_optimizer_step(self, optimizer) -> None:
        SSLMethod.on_before_optimizer_step(self, optimizer)

    def shared_step(self, batch: dict) -> dict:
        self.prototypes.normalize()
        epoch = self.current_epoch
        # One backbone pass per crop (ours, like the official code, one per resolution: other BN statistics).
        feats = [self.backbone(view) for view in batch["views"]]
        projections = [F.normalize(self.projector(f), dim=1) for f in feats]
        scores = [self.prototypes(p, epoch) for p in projections]
        queued = self._queue_scores(projections[:NUM_ASSIGNED_CROPS], epoch)
        loss = self.criterion(scores[:NUM_ASSIGNED_CROPS], scores[NUM_ASSIGNED_CROPS:], queued)
        return {"loss": loss.reshape(()), "feats": feats[0]}  # SwaVLoss returns shape [1]

    @torch.no_grad()
    def _queue_scores(self, projections: list[torch.Tensor], epoch: int) -> list[torch.Tensor] | None:
        if self.queues is None:
            return None
        # The banks return their rows as they were before this batch went in, [dim, size].
        queued = [queue(p, update=True)[1].T for queue, p in zip(self.queues, projections)]
        if epoch < self.hparams.epoch_queue_starts:
            return None
        return [self.prototypes(q, epoch) for q in queued]


class _DINOTeacher:
    """lightly's DINO teacher machinery (its ImageNet ``resnet50/dino.py``, ``vitb16/dino.py``, ``vitb16/ibot.py``):
    ``DINOProjectionHead``, an EMA copy of the student frozen with ``deactivate_requires_grad`` and moved by
    ``update_momentum`` on ``cosine_schedule`` over ``estimated_stepping_batches``, ``cancel_last_layer_gradients``
    during the first ``freeze_last_layer`` epochs, and the global-norm clipping of lightly's ResNet DINO and iBOT
    benchmarks (``clip_gradients(..., "norm")``; ours and the official code clip each parameter on its own;
    lightly's ViT DINO benchmark does not clip). Clipped here: the student's parameters (lightly: every
    parameter of its optimizer, its online classifier's too)."""

    def _dino_head(self, feat_dim: int, out_dim: int) -> DINOProjectionHead:
        hp = self.hparams
        return DINOProjectionHead(feat_dim, hp.proj_hidden_dim, hp.bottleneck_dim, out_dim, batch_norm=hp.use_bn_in_head,
                                  freeze_last_layer=hp.freeze_last_layer, norm_last_layer=hp.norm_last_layer)

    def _teacher_head(self, student: DINOProjectionHead, feat_dim: int, out_dim: int) -> DINOProjectionHead:
        # lightly's weight-normalised head cannot be deep-copied once built (torch's old weight_norm), so its
        # benchmarks build the teacher's head anew, from other random weights; here it starts as the student's
        # (official DINO, iBOT: teacher.load_state_dict(student.state_dict())), as the other adapters' copies do.
        teacher = self._dino_head(feat_dim, out_dim)
        teacher.load_state_dict(student.state_dict())
        deactivate_requires_grad(teacher)
        return teacher

    def _momentum(self) -> float:
        hp = self.hparams
        return cosine_schedule(self.trainer.global_step, int(self.trainer.estimated_stepping_batches),
                               hp.base_momentum, hp.final_momentum)

    def _student_heads(self) -> list[DINOProjectionHead]:
        return [self.projector]

    def _student_network(self) -> list[nn.Module]:
        return [self.backbone, *self._student_heads()]

    def embed(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.backbone(images)  # the embedding: the head's L2-normalised bottleneck, as ours
        return {"feats": feats, "embeds": F.normalize(self.projector.layers(feats), dim=-1)}

    def _check_centering(self) -> None:
        if self.hparams.centering == "sinkhorn_knopp":
            raise ValueError(f"lightly's DINOLoss has no Sinkhorn-Knopp centring: run {type(self).__name__} with "
                             "centering: centre (or none)")

    def _centre_momentum(self) -> float:
        # lightly centres always; a centre that never moves from 0 is no centring (centering: none)
        return 1.0 if self.hparams.centering == "none" else self.hparams.centre_momentum

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        SSLMethod.on_before_optimizer_step(self, optimizer)  # not ours: lightly cancels and clips itself
        for head in self._student_heads():
            head.cancel_last_layer_gradients(self.current_epoch)
        if self.hparams.clip_grad:
            parameters = [p for module in self._student_network() for p in module.parameters()]
            torch.nn.utils.clip_grad_norm_(parameters, self.hparams.clip_grad)


class LightlyDINO(_DINOTeacher, _MomentumEncoder, DINO):
    """lightly's DINO: ``DINOProjectionHead``, ``DINOLoss`` (its running centre and its per-epoch ``linspace``
    teacher-temperature warm-up, the same schedule as ours), the teacher of :class:`_DINOTeacher`, moved at
    the top of the training step as lightly's benchmarks do. Multi-crop as lightly's benchmarks: the student's
    backbone runs once on the global crops and once on the local crops (concatenated; the recipes' local
    crops share one size), the teacher on the global crops. The backbone is ours (lightly's ViT benchmark
    wraps its ViT in ``MaskedVisionTransformerTIMM``, which re-initialises it MAE-style with a fixed sin-cos
    position embedding, and builds the teacher's ViT from other random weights; here both rows start from the
    same weights)."""

    def build_heads(self, feat_dim: int) -> None:
        self._check_centering()
        hp = self.hparams
        self.projector = self._dino_head(feat_dim, hp.out_dim)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        deactivate_requires_grad(self.backbone_momentum)
        self.projection_head_momentum = self._teacher_head(self.projector, feat_dim, hp.out_dim)
        self.criterion = DINOLoss(hp.out_dim, hp.warmup_teacher_temp, hp.teacher_temp, hp.warmup_teacher_temp_epochs,
                                  hp.student_temp, self._centre_momentum())

    def shared_step(self, batch: dict) -> dict:
        self._update_momentum()
        views = batch["views"]
        global_views = torch.cat(views[:2])
        teacher_out = self._forward_momentum(global_views)
        global_feats = self.backbone(global_views)
        student_out = self.projector(global_feats)
        if len(views) > 2:
            student_out = torch.cat([student_out, self.projector(self.backbone(torch.cat(views[2:])))])
        loss = self.criterion(teacher_out.chunk(2), student_out.chunk(len(views)), epoch=self.current_epoch)
        return {"loss": loss, "feats": global_feats[: views[0].shape[0]]}


class LightlyIBOT(_DINOTeacher, IBOT):
    """lightly's iBOT (its ImageNet ``vitb16/ibot.py``; DINOv2's KoLeo from ``vitb16/dinov2.py``): the ViT in
    lightly's ``MaskedVisionTransformerTIMM`` (its mask token and masked ``encode``; wrapped without
    re-initialising, so the backbone starts as ours, and ``antialias=False`` for the local crops' position
    embedding, as lightly's benchmark), ``random_block_mask`` over the global crops, ``DINOProjectionHead``
    (one shared by [CLS] and patches, or a separate patch head), ``DINOLoss`` on the [CLS] outputs of every
    crop, ``IBOTPatchLoss`` on the masked patches, ``KoLeoLoss`` on the student's global [CLS] features, and the
    teacher of :class:`_DINOTeacher`, moved after the optimizer step (lightly's ``on_train_batch_end``).

    Where lightly differs: its patch centre follows the masked teacher patches only (DINOv2's; ours all of the
    global crops' teacher patches, iBOT's); no Sinkhorn-Knopp centring (refused); the smallest mask block is
    (min(H, W) // 3)^2 patches (lightly's benchmark and iBOT: 4 on CIFAR's 8 x 8 grid, ours 4 too); masked
    tokens are selected with a boolean mask (a host sync per step). The teacher temperatures are the recipe's
    schedule (``teacher_temp_now``: per epoch, or per step with ``teacher_temp_per_step``, lightly's
    benchmark's ``linear_warmup_schedule``), passed to lightly's losses as its benchmark passes its own."""

    def build_heads(self, feat_dim: int) -> None:
        self._check_centering()
        hp = self.hparams
        name = hp.backbone if isinstance(hp.get("backbone"), str) else type(self.backbone).__name__
        vit = check_patch_tokens(self.backbone, type(self).__name__, name)
        self.masked_backbone = MaskedVisionTransformerTIMM(vit=vit, weight_initialization="skip", antialias=False,
                                                           pos_embed_initialization="skip")
        patch_dim = hp.out_dim if hp.shared_head else hp.patch_out_dim or hp.out_dim
        self.projector = self._dino_head(feat_dim, hp.out_dim)
        self.patch_projector = None if hp.shared_head else self._dino_head(feat_dim, patch_dim)
        self.backbone_momentum = copy.deepcopy(self.masked_backbone)
        deactivate_requires_grad(self.backbone_momentum)
        self.projection_head_momentum = self._teacher_head(self.projector, feat_dim, hp.out_dim)
        self.patch_head_momentum = None if hp.shared_head else self._teacher_head(self.patch_projector, feat_dim, patch_dim)
        self.criterion = DINOLoss(hp.out_dim, student_temp=hp.student_temp, center_momentum=self._centre_momentum())
        self.patch_criterion = IBOTPatchLoss(patch_dim, student_temp=hp.student_temp,
                                             center_momentum=self._centre_momentum())
        self.koleo_criterion = KoLeoLoss() if hp.koleo_weight > 0 else None

    def _student_heads(self) -> list[DINOProjectionHead]:
        return [self.projector] + ([self.patch_projector] if self.patch_projector is not None else [])

    def _student_network(self) -> list[nn.Module]:
        return [self.masked_backbone, *self._student_heads()]  # the ViT and lightly's mask token

    def parameter_groups(self) -> list[dict]:
        return SSLMethod.parameter_groups(self)  # the mask token is lightly's, inside masked_backbone

    def shared_step(self, batch: dict) -> dict:
        hp = self.hparams
        views = batch["views"]
        global_views = torch.cat(views[:2])
        # Masking (lightly's benchmark): block masks for a share of the global crops, prefix tokens never masked.
        height, width = self.backbone.patch_embed.dynamic_feat_size(tuple(global_views.shape[-2:]))
        low, high = hp.mask_ratio_range
        block_mask = random_block_mask((len(global_views), height, width), batch_mask_ratio=hp.mask_probability,
                                       min_image_mask_ratio=low, max_image_mask_ratio=high,
                                       min_num_masks_per_block=(min(height, width) // 3) ** 2, device=global_views.device)
        prefix = self.backbone.num_prefix_tokens
        mask = global_views.new_zeros((len(global_views), prefix + height * width), dtype=torch.bool)
        mask[:, prefix:] = block_mask.flatten(start_dim=1)
        patch_head = self.projector if self.patch_projector is None else self.patch_projector
        teacher_patch_head = self.projection_head_momentum if self.patch_head_momentum is None else self.patch_head_momentum
        with torch.no_grad():
            teacher_tokens = self.backbone_momentum.encode(global_views)
            teacher_cls_out = self.projection_head_momentum(teacher_tokens[:, 0])
            teacher_masked_out = teacher_patch_head(teacher_tokens[mask])
        student_tokens = self.masked_backbone.encode(global_views, mask=mask)
        student_cls = student_tokens[:, 0]
        student_cls_out = self.projector(student_cls)
        student_masked_out = patch_head(student_tokens[mask])
        if len(views) > 2:
            local_cls = self.masked_backbone.encode(torch.cat(views[2:]))[:, 0]
            student_cls_out = torch.cat([student_cls_out, self.projector(local_cls)])
        cls_loss = self.criterion(teacher_cls_out.chunk(2), student_cls_out.chunk(len(views)),
                                  teacher_temp=self.teacher_temp_now())
        patch_loss = self.patch_criterion(teacher_masked_out, student_masked_out, block_mask,
                                          teacher_temp=self.teacher_patch_temp_now())
        out = {"loss/cls": cls_loss, "loss/patch": patch_loss}
        loss = cls_loss + hp.patch_loss_weight * patch_loss
        if self.koleo_criterion is not None:  # lightly's DINOv2 benchmark: per global crop, on the [CLS] features
            out["loss/koleo"] = sum(self.koleo_criterion(c) for c in student_cls.chunk(2))
            loss = loss + hp.koleo_weight * out["loss/koleo"]
        return {"loss": loss, **out, "feats": student_cls[: views[0].shape[0]]}

    def on_optimizer_step(self, step: int) -> None:
        momentum = self._momentum()
        update_momentum(self.masked_backbone, self.backbone_momentum, m=momentum)
        update_momentum(self.projector, self.projection_head_momentum, m=momentum)
        if self.patch_projector is not None:
            update_momentum(self.patch_projector, self.patch_head_momentum, m=momentum)


class LightlyMAE(MAE):
    """lightly's MAE (its ImageNet ``vitb16/mae.py``): the ViT in ``MaskedVisionTransformerTIMM`` (lightly's
    MAE initialisation of a fresh backbone, the same distributions as ours drawn in another order, and its
    fixed sin-cos position embedding with ``fixed_pos_embed``), ``random_token_mask`` (the class token always
    kept), a ``Linear`` into ``MaskedVisionTransformerDecoderTIMM`` (the decoder lightly's benchmark uses;
    ``MAEDecoderTIMM`` is deprecated) and a ``Linear`` prediction head, and ``MSELoss`` on the masked patches.
    lightly's MAE benchmark regresses raw pixels; ``norm_pix_loss`` (the recipe's, the paper's default) uses
    lightly's ``normalize_mean_var`` target, as its Pixio benchmark (MAE with a deeper decoder) does. The
    online probe's ``feats`` follow ``probe_features`` as ours ("visible": the masked pass's class token,
    lightly's benchmark's). No start from files: ``init_ckpt`` and ``init_weights`` are refused."""

    def build_heads(self, feat_dim: int) -> None:
        hp = self.hparams
        if hp.get("init_ckpt") is not None or hp.get("init_weights") is not None:
            raise ValueError("LightlyMAE starts from scratch: run it with init_ckpt and init_weights unset")
        name = hp.backbone if isinstance(hp.get("backbone"), str) else type(self.backbone).__name__
        vit = check_patch_tokens(self.backbone, type(self).__name__, name)
        if type(vit) is not VisionTransformer or vit.num_prefix_tokens != 1:
            raise ValueError(f"lightly's MAE takes a timm VisionTransformer with one class token (no registers); "
                             f"{name!r} is a {type(vit).__name__} with {vit.num_prefix_tokens} prefix tokens")
        self.encoder = MaskedVisionTransformerTIMM(
            vit=vit, weight_initialization="" if self._custom_backbone is None else "skip",
            pos_embed_initialization="sincos" if hp.fixed_pos_embed else "skip")
        self.patch_size = vit.patch_embed.patch_size[0]
        self.decoder_embed = nn.Linear(vit.embed_dim, hp.decoder_embed_dim)
        self.decoder = MaskedVisionTransformerDecoderTIMM(
            num_patches=vit.patch_embed.num_patches, embed_dim=hp.decoder_embed_dim, depth=hp.decoder_depth,
            num_heads=hp.decoder_num_heads, num_prefix_tokens=vit.num_prefix_tokens, mlp_ratio=hp.decoder_mlp_ratio)
        self.prediction_head = nn.Linear(hp.decoder_embed_dim, self.patch_size ** 2 * vit.patch_embed.proj.in_channels)
        self.decoder_embed.apply(init_weights)  # outside the decoder: lightly's benchmark initialises them itself
        self.prediction_head.apply(init_weights)
        self.criterion = nn.MSELoss()

    def masked_reconstruction(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hp = self.hparams
        batch_size, sequence_length = images.shape[0], self.encoder.sequence_length
        idx_keep, idx_mask = random_token_mask((batch_size, sequence_length), hp.mask_ratio, device=images.device)
        encoded = self.encoder.encode(images, idx_keep=idx_keep)
        tokens = self.decoder_embed(encoded)
        scattered = set_at_index(tokens.new_zeros(batch_size, sequence_length, tokens.shape[-1]), idx_keep, tokens)
        pred = self.prediction_head(get_at_index(self.decoder(scattered, idx_mask=idx_mask), idx_mask))
        target = get_at_index(patchify(images, self.patch_size), idx_mask - 1)  # the class token is index 0
        if hp.norm_pix_loss:
            target = normalize_mean_var(target)
        return self.criterion(pred, target), encoded[:, 0]


#: our method name -> lightly's implementation of it in our harness
LIGHTLY_COUNTERPARTS: dict[str, type[SSLMethod]] = {
    "SimCLR": LightlySimCLR,
    "BYOL": LightlyBYOL,
    "BarlowTwins": LightlyBarlowTwins,
    "MoCoV2": LightlyMoCoV2,
    "MoCoV3": LightlyMoCoV3,
    "NNCLR": LightlyNNCLR,
    "DCL": LightlyDCL,
    "DCLW": LightlyDCLW,
    "SimSiam": LightlySimSiam,
    "VICReg": LightlyVICReg,
    "SwAV": LightlySwAV,
    "DINO": LightlyDINO,
    "IBOT": LightlyIBOT,
    "MAE": LightlyMAE,
}


#: the self-check's tiny backbones: a ResNet, and for the ViT-only methods a one-block ViT of 4 x 4 patches
TINY_RESNET = {"backbone": "resnet18", "backbone_kwargs": {"layers": [1, 1, 1, 1], "channels": [8, 8, 8, 8]},
               "cifar_stem": True}
TINY_VIT = {"backbone": "vit_tiny_patch16_224", "backbone_kwargs": {
    "img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2, "dynamic_img_size": True}}
#: method -> (backbone arguments, view sizes) where the two-view ResNet check does not fit (multi-crop, ViTs)
CHECK_SETUPS = {"DINO": (TINY_RESNET, (32, 32, 16)), "IBOT": (TINY_VIT, (32, 32, 16)), "MAE": (TINY_VIT, (32,))}


def _check(method: str, adapter: type[SSLMethod]) -> str:
    """Two training steps' hooks of a tiny adapter on fixed batches (``shared_step``, backward,
    ``on_before_optimizer_step``, ``on_optimizer_step``): the loss is finite and reaches the backbone."""
    import inspect
    import random
    from types import SimpleNamespace

    torch.manual_seed(0)
    random.seed(0)  # lightly's random_block_mask draws with Python's random
    small = {"proj_hidden_dim": 64, "proj_dim": 32, "pred_hidden_dim": 32, "queue_size": 16, "num_prototypes": 16,
             "epoch_queue_starts": 1,  # SwAV: the second step scores its queue
             "out_dim": 64, "bottleneck_dim": 16, "decoder_embed_dim": 16, "decoder_depth": 1, "decoder_num_heads": 2}
    ours = [cls for cls in adapter.__mro__ if cls.__module__.startswith("ssl_lightning.methods.ssl.")]
    accepted = set().union(*(inspect.signature(cls.__init__).parameters for cls in ours))
    backbone, sizes = CHECK_SETUPS.get(method, (TINY_RESNET, (32, 32)))
    model = adapter(**backbone, image_size=32, **{k: v for k, v in small.items() if k in accepted})
    model.configure_model()
    losses = []
    for step in range(2):
        model._trainer = SimpleNamespace(global_step=step, estimated_stepping_batches=10, current_epoch=step,
                                         world_size=1)
        batch = {"views": [torch.randn(8, 3, size, size) for size in sizes], "label": torch.zeros(8).long(),
                 "index": torch.arange(8)}
        model.zero_grad()
        loss = model.shared_step(batch)["loss"]
        loss.backward()
        grads = [p.grad.abs().sum() for p in model.backbone.parameters() if p.grad is not None]
        if loss.dim() != 0 or not torch.isfinite(loss) or not grads or not torch.stack(grads).sum() > 0:
            raise AssertionError(f"{method}: loss {loss}, backbone gradients {grads}")
        model.on_before_optimizer_step(None)  # gradient surgery and clipping (no optimizer is read)
        model.on_optimizer_step(step)  # a teacher's EMA update
        losses.append(f"{loss.item():.4f}")
    return f"{method:<12} loss {', '.join(losses)}; gradient reaches the backbone"


if __name__ == "__main__":
    for name, cls in LIGHTLY_COUNTERPARTS.items():
        print(_check(name, cls))
