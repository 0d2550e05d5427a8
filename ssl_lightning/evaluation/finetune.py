"""Fine-tuning: a pretrained backbone (and, for SimCLRv2, the first blocks of its projector) and a new
linear head, trained together with labels."""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from ssl_lightning.components.classifier_files import FINETUNED_CLASSIFIER, projector_blocks
from ssl_lightning.core.data_link import read_batch_size, require_views
from ssl_lightning.core.module import saved_data_facts
from ssl_lightning.core.optimization import OptimizationConfig, configure_optimization
from ssl_lightning.core.step_logging import log_learning_rates
from ssl_lightning.evaluation.pretrained import PretrainedBackboneModule
from ssl_lightning.losses import labelled_cross_entropy
from ssl_lightning.optim import layer_decay_param_groups


class FineTune(PretrainedBackboneModule):
    """Fine-tunes the whole network of a method checkpoint (backbone [+ projector blocks] + a new linear head).

    Every parameter trains, BatchNorm included (train mode), with cross-entropy on the batch's first
    view: the DataModule's ``views`` recipe is the augmentation (``configs/eval/finetune.yaml`` uses
    the ``supervised`` preset). Images labelled -1 go through the network (BatchNorm's batch
    statistics see them) but add nothing to the loss, which masks them rather than selecting the
    others (a selection's size is read on the host: a GPU sync per step); a batch without any
    labelled image contributes a zero loss, so every process still takes part in the step under DDP.

    Defaults follow MAE's and BEiT's fine-tuning (He et al. 2022, Bao et al. 2022): AdamW, ``lr``
    per 256 images scaled linearly with the global batch, weight decay 0.05 (not on biases,
    normalisation parameters and the backbone's ``no_weight_decay()``, a ViT's pos_embed and
    cls_token), linear warm-up over ``warmup_epochs`` then cosine per step, label smoothing 0.1,
    the head initialised with std 2e-5. The epochs are the Trainer's ``max_epochs``. Logs
    ``train/finetune_loss``, ``val/finetune_top1``, ``val/finetune_top5`` and ``lr/<group>``; after
    ``fit`` writes ``finetune_top1.json`` (the last epoch's top-1, not the best) and a line of
    ``results.md`` into the run directory.

    SimCLRv2 (Chen et al. 2020, "Big Self-Supervised Models are Strong Semi-Supervised Learners",
    section 2) fine-tunes "from a middle layer" of the projector: ``projector_layers=1`` keeps the
    first Linear-BN-ReLU block of the checkpoint's 3-layer projector (google-research/simclr
    ``tf2/run.py`` ``ft_proj_selector=1``) on top of the backbone, with its weights and BatchNorm
    statistics, and trains it with the rest; the head sits on that block's output. Its paper
    optimizer is ``configs/cifar10/simclrv2_finetune.yaml``'s; with ``optimizer: lars`` the groups
    follow SimCLR's LARS (``lars_groups_as_simclr``). The checkpoint this writes is a classifier file:
    ``KD --model.init_args.teacher_ckpt <it>`` distils it (``components.classifier_files``).
    To fine-tune on the labelled images only (SimCLRv2's 1 % / 10 %), give the DataModule
    ``label_fraction`` and ``unlabelled: drop``.

    Args:
        pretrained: method checkpoint whose backbone is fine-tuned.
        optimizer, momentum, optimizer_kwargs: as for the methods (``ssl_lightning.optim.create_optimizer``);
            ``momentum`` only reaches sgd and lars.
        lr: peak learning rate per 256 images (MAE: 5e-4 for ViT-B, 1e-3 for ViT-L).
        lr_scaling: "linear", "sqrt" or "none" (``lr`` used as given).
        weight_decay: weight decay of the decayed groups (decoupled with AdamW).
        warmup_epochs: linear warm-up length; then half-cosine to ``min_lr_ratio`` x each group's peak.
        layer_decay: layer-wise LR decay (``ssl_lightning.optim.layer_decay_param_groups``): a layer
            ``i`` below the head trains at ``layer_decay ** i`` of the LR. None or 1.0: off. MAE
            uses 0.65 (ViT-B) and 0.75 (ViT-L / H); ResNets are usually fine-tuned without it.
        label_smoothing: cross-entropy label smoothing.
        drop_path_rate: stochastic depth of a timm backbone, rebuilt with it (MAE: 0.1 for ViT-B);
            0 builds the backbone exactly as it was pretrained.
        projector_layers: hidden blocks (Linear-BN-ReLU) of the checkpoint's ``projector`` MLPHead kept
            between the backbone and the head and fine-tuned with them: 0 (default) fine-tunes the
            backbone alone, SimCLRv2 keeps 1 of its 3-layer projector's 2.
    """

    def __init__(
        self,
        pretrained: str,
        optimizer: Literal["adamw", "sgd", "lars", "lamb", "adamp", "adam"] = "adamw",
        lr: float = 5e-4,
        lr_scaling: Literal["linear", "sqrt", "none"] = "linear",
        weight_decay: float = 0.05,
        momentum: float = 0.9,
        optimizer_kwargs: dict[str, Any] | None = None,
        warmup_epochs: float = 5.0,
        min_lr_ratio: float = 0.0,
        layer_decay: float | None = None,
        label_smoothing: float = 0.1,
        drop_path_rate: float = 0.0,
        projector_layers: int = 0,
        num_classes: int | None = None,
        batch_size: int | None = None,
        in_chans: int | None = None,
        image_size: int | None = None,
    ):
        super().__init__(pretrained, num_classes, batch_size, in_chans, image_size)
        if layer_decay is not None and not 0.0 < layer_decay <= 1.0:
            raise ValueError(f"FineTune: layer_decay must be in (0, 1] or None (off), got {layer_decay}.")
        if projector_layers < 0:
            raise ValueError(f"FineTune: projector_layers must be >= 0 (0: no projector block), got {projector_layers}")
        self.projector: nn.Sequential | None = None
        self.head: nn.Linear | None = None

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if isinstance(self.trainer.strategy, FSDPStrategy):
            # FSDP renames the wrapped modules' parameters and flattens their shapes, which the
            # layer ids and the no-decay rule read.
            raise ValueError("FineTune does not support FSDP yet; fine-tune with DDP (--trainer.strategy ddp).")
        num_views = getattr(self.trainer.datamodule, "num_views", None)
        if stage == "fit" and num_views not in (None, 1):
            raise ValueError(
                f"FineTune trains on one view per image, but the DataModule's view recipe makes {num_views}; "
                "set data.views: supervised (as configs/eval/finetune.yaml does) or a one-view ViewSpec list."
            )

    def configure_model(self) -> None:
        if self.backbone is None:
            self._load_backbone()
        if self.head is not None:
            return
        num_classes = self.hparams.num_classes
        if not num_classes:
            raise ValueError(
                "FineTune needs num_classes: use a labelled DataModule (it links num_classes) or pass num_classes."
            )
        self.head = nn.Linear(self._head_input_dim(), num_classes)
        # MAE (after MoCo v3): near-zero logits at the start, so the new head's first gradients do
        # not disturb the pretrained features.
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)
        self.val_top1 = MulticlassAccuracy(num_classes, average="micro")
        self.val_top5 = MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro")

    def _load_backbone(self) -> None:
        rate = self.hparams.drop_path_rate
        try:
            checkpoint = self.load_pretrained_backbone(**({"drop_path_rate": rate} if rate else {}))
        except TypeError as error:
            if not rate:
                raise
            raise ValueError(
                f"FineTune: drop_path_rate={rate}, but the checkpoint's backbone builder does not take it ({error}). "
                "timm's ViTs, ResNets and ConvNeXts do, torchvision's ResNets do not; set drop_path_rate to 0."
            ) from error
        self._load_projector(checkpoint)
        # Lightning keeps each submodule's mode, and the checkpoint's backbone comes in eval mode.
        self.backbone.train()

    def _load_projector(self, checkpoint: dict) -> None:
        source = f"pretrained={self.hparams.pretrained}"
        self.projector = projector_blocks(type(self).__name__, checkpoint["state_dict"], self.hparams.projector_layers,
                                          source).train()

    def _head_input_dim(self) -> int:
        linears = [layer for layer in self.projector if isinstance(layer, nn.Linear)]
        return linears[-1].out_features if linears else self.feat_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.projector(self.backbone(images)))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        require_views(batch, type(self).__name__)
        images = batch["views"][0]
        # Every image goes through the network (no selection by mask: a host sync per step); the
        # unlabelled ones (label -1) add nothing to the loss.
        loss = labelled_cross_entropy(self(images), batch["label"], self.hparams.label_smoothing)
        self.log("train/finetune_loss", loss, prog_bar=True, batch_size=images.shape[0], sync_dist=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        require_views(batch, type(self).__name__)
        labelled = batch["label"] >= 0
        logits = self(batch["views"][0][labelled])
        self.val_top1(logits, batch["label"][labelled])
        self.val_top5(logits, batch["label"][labelled])
        self.log("val/finetune_top1", self.val_top1, prog_bar=True)
        self.log("val/finetune_top5", self.val_top5)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        log_learning_rates(self)

    def configure_optimizers(self):
        hp = self.hparams
        # The kept projector blocks count as the top layer, with the head (layer decay leaves them at full LR).
        top = nn.Sequential(self.projector, self.head)
        groups = layer_decay_param_groups(self.backbone, top, hp.weight_decay, hp.layer_decay)
        if hp.optimizer == "lars":
            groups = lars_groups_as_simclr(groups, self.head)
        return configure_optimization(
            OptimizationConfig.from_hparams(hp), groups, self.trainer, hp.batch_size or read_batch_size(self.trainer)
        )

    def protocol(self) -> str:
        hp = self.hparams
        peak = max(group["initial_lr"] for group in self.trainer.optimizers[0].param_groups)
        decay = f"layer decay {hp.layer_decay}" if hp.layer_decay not in (None, 1.0) else "no layer decay"
        views = getattr(self.trainer.datamodule, "views", None)
        augmentation = f"the '{views}' view" if isinstance(views, str) else "the recipe's own view"
        blocks = f" + {hp.projector_layers} projector block(s)" if hp.projector_layers else ""
        return (
            f"fine-tuning of the whole network{blocks} + linear head on {augmentation}; {hp.optimizer} "
            f"lr {hp.lr} per 256 ({hp.lr_scaling} scaling: peak {peak:.3g}), wd {hp.weight_decay}, "
            f"{hp.warmup_epochs:g} warm-up epochs + cosine per step, {decay}, label smoothing {hp.label_smoothing}, "
            f"drop path {hp.drop_path_rate}, batch {hp.batch_size} per process"
        )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # What makes this checkpoint a classifier file (a KD teacher): how to rebuild the backbone without
        # the pretrained checkpoint, how many projector blocks follow it, and the data it was tuned on.
        checkpoint[FINETUNED_CLASSIFIER] = {"builder": self.backbone_builder,
                                            "projector_layers": self.hparams.projector_layers}
        datamodule = getattr(self._trainer, "datamodule", None)
        if datamodule is not None:
            checkpoint["data_facts"] = saved_data_facts(datamodule)

    def on_fit_end(self) -> None:
        top1 = self.trainer.callback_metrics.get("val/finetune_top1")
        if top1 is None:
            rank_zero_warn("FineTune: no validation ran (limit_val_batches=0?), so no result was written.")
            return
        value = 100.0 * float(top1)
        rank_zero_info(f"FineTune: top-1 {value:.2f}% on the val split after {self.trainer.current_epoch} epochs "
                       f"({self.protocol()})")
        self.write_result(self.protocol(), "finetune_top1", value, epochs=self.trainer.current_epoch)


def lars_groups_as_simclr(groups: list[dict], head: nn.Module) -> list[dict]:
    """The parameter groups for LARS as SimCLR's (google-research/simclr ``tf2/lars_optimizer.py``,
    ``tf2/model.py`` ``build_optimizer``): every parameter's LR is adapted by the trust ratio except
    biases, BatchNorm parameters and the supervised head's, whatever the weight decay. timm's ``Lars``
    adapts only groups with weight decay unless a group sets ``always_adapt``, so SimCLRv2's fine-tuning
    (weight decay 0) would train without any adaptation. Here the groups with decayed parameters adapt
    always, and the head's parameters leave them for a group of their own (``<name>_head``): a head
    that starts near zero would otherwise take near-zero steps. (With weight decay, timm also adapts that
    head group; SimCLR does not.) The ``no_decay`` groups (biases, norms) never adapt, as in SimCLR."""
    head_params = {id(param) for param in head.parameters()}
    out = []
    for group in groups:
        if group["name"].endswith("no_decay"):
            out.append(group)
            continue
        body = [param for param in group["params"] if id(param) not in head_params]
        top = [param for param in group["params"] if id(param) in head_params]
        if body:
            out.append({**group, "params": body, "always_adapt": True})
        if top:
            out.append({**group, "name": f"{group['name']}_head", "params": top, "always_adapt": False})
    return out
