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
on a Linear followed by BatchNorm.

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
        NegativeCosineSimilarity,
        NTXentLoss,
        SwaVLoss,
        VICRegLoss,
    )
    from lightly.models.modules.heads import (
        BarlowTwinsProjectionHead,
        BYOLPredictionHead,
        BYOLProjectionHead,
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
    from lightly.models.modules.memory_bank import MemoryBankModule
    from lightly.models.modules.nn_memory_bank import NNMemoryBankModule
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.utils.scheduler import cosine_schedule
except ModuleNotFoundError as error:
    raise ModuleNotFoundError(
        "benchmarks/lightly_counterparts.py needs lightly, which ssl_lightning does not depend on (benchmarks "
        f"only): `pip install lightly` (tested with 1.6.0). Import failed with: {error}"
    ) from error

from ssl_lightning.methods import (
    BYOL,
    DCL,
    DCLW,
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
}


def _check(method: str, adapter: type[SSLMethod]) -> str:
    """Two shared_steps of a tiny adapter on fixed batches: the loss is finite and reaches the backbone."""
    import inspect
    from types import SimpleNamespace

    torch.manual_seed(0)
    small = {"proj_hidden_dim": 64, "proj_dim": 32, "pred_hidden_dim": 32, "queue_size": 16, "num_prototypes": 16,
             "epoch_queue_starts": 1}  # SwAV: the second step scores its queue
    ours = [cls for cls in adapter.__mro__ if cls.__module__.startswith("ssl_lightning.methods.ssl.")]
    accepted = set().union(*(inspect.signature(cls.__init__).parameters for cls in ours))
    model = adapter(backbone="resnet18", backbone_kwargs={"layers": [1, 1, 1, 1], "channels": [8, 8, 8, 8]},
                    cifar_stem=True, image_size=32, **{k: v for k, v in small.items() if k in accepted})
    model.configure_model()
    losses = []
    for step in range(2):
        model._trainer = SimpleNamespace(global_step=step, estimated_stepping_batches=10, current_epoch=step,
                                         world_size=1)
        batch = {"views": [torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)], "label": torch.zeros(8).long(),
                 "index": torch.arange(8)}
        model.zero_grad()
        loss = model.shared_step(batch)["loss"]
        loss.backward()
        grads = [p.grad.abs().sum() for p in model.backbone.parameters() if p.grad is not None]
        if loss.dim() != 0 or not torch.isfinite(loss) or not grads or not torch.stack(grads).sum() > 0:
            raise AssertionError(f"{method}: loss {loss}, backbone gradients {grads}")
        losses.append(f"{loss.item():.4f}")
    return f"{method:<12} loss {', '.join(losses)}; gradient reaches the backbone"


if __name__ == "__main__":
    for name, cls in LIGHTLY_COUNTERPARTS.items():
        print(_check(name, cls))
