"""iBOT (Zhou et al., ICLR 2022, "iBOT: Image BERT Pre-Training with Online Tokenizer"): DINO's [CLS]
self-distillation plus masked image modelling, the student predicting the teacher's outputs for the
patches it sees masked; with DINOv2's additions (Oquab et al. 2023) as options."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from timm.models import checkpoint_seq
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ssl_lightning.components.heads import DINOHead
from ssl_lightning.components.masking import BlockMasks, check_patch_tokens, ibot_block_masks
from ssl_lightning.components.multicrop import forward_per_resolution, global_views
from ssl_lightning.components.teacher import EMATeacher
from ssl_lightning.core.optimization import clip_gradients_per_parameter, resolve_warmup_steps
from ssl_lightning.losses.dino import dino_centre_update, dino_loss, dino_teacher_targets
from ssl_lightning.losses.ibot import ibot_patch_loss, ibot_patch_targets
from ssl_lightning.losses.koleo import koleo_loss
from ssl_lightning.methods.ssl.dino import DINO, NUM_GLOBAL_CROPS, teacher_temperature


class IBOTOutput(NamedTuple):
    """``feats``: [N, D] the ViT's pooled features (the [CLS] token); ``cls_logits``: [N, K] the head's
    outputs for them; ``patch_logits``: [N, L, K'] the (patch) head's outputs for every patch token."""

    feats: torch.Tensor
    cls_logits: torch.Tensor
    patch_logits: torch.Tensor


class IBOTNetwork(nn.Module):
    """The student network, which the teacher copies: the ViT, the [CLS] head and, unless the heads are
    shared, the patch head (iBOT's ``MultiCropWrapper`` with its ``iBOTHead``)."""

    def __init__(self, backbone: nn.Module, projector: nn.Module, patch_projector: nn.Module | None):
        super().__init__()
        self.backbone, self.projector, self.patch_projector = backbone, projector, patch_projector

    def forward(self, images: torch.Tensor, masks: torch.Tensor | None = None,
                mask_token: torch.Tensor | None = None) -> IBOTOutput:
        feats, patches = self.backbone(images, masks=masks, mask_token=mask_token, return_patch_tokens=True)
        if self.patch_projector is None:  # one head: one pass over the [CLS] and patch tokens together
            logits = self.projector(torch.cat([feats.unsqueeze(1), patches], dim=1))
            return IBOTOutput(feats, logits[:, 0], logits[:, 1:])
        return IBOTOutput(feats, self.projector(feats), self.patch_projector(patches))


class IBOT(DINO):
    """iBOT with its ViT-S/16 defaults (bytedance/ibot ``main_ibot.py`` and the README's ViT-S command): a
    ViT-S/16, one :class:`~ssl_lightning.components.heads.DINOHead` shared by the [CLS] and patch tokens
    (``shared_head``; 3 layers, 2048 hidden, bottleneck 256, 8,192 outputs, the last layer's gain trained),
    student temperature 0.1, teacher temperature 0.04 rising to 0.07 over 30 epochs for both tokens,
    running centres with momentum 0.9 (the patch centre, iBOT's ``center2``, from every teacher patch of the
    global crops), EMA momentum 0.996 -> 1, AdamW with LR 5e-4 per 256 images, 10
    warm-up epochs and a cosine to 1e-6, weight decay 0.04 -> 0.4, per-parameter gradient clipping at 3.0,
    the last layer frozen for the first epoch (all of this :class:`DINO`'s), and blockwise masking
    (:func:`~ssl_lightning.components.masking.ibot_block_masks`): half of the global crops, each with a
    ratio in [0.1, 0.5]. The paper's crops are 2 global (scale 0.25-1) and 10 local (0.05-0.25).

    Each step: the teacher (backbone and heads, one EMA copy) sees the two global crops unmasked; the
    student sees them masked, the masked patches' embeddings replaced by a learned mask token (zero at
    the start; iBOT's ``masked_embed``, DINOv2's ``mask_token``) before the position embeddings, and the
    local crops unmasked. The loss, with the [CLS] outputs of every crop and the patch outputs of the
    global crops:

        loss = L_cls + patch_loss_weight * L_patch + koleo_weight * (KoLeo_1 + KoLeo_2)

    ``L_cls`` is DINO's (:func:`~ssl_lightning.losses.dino.dino_loss`: pairs of different crops);
    ``L_patch`` (:func:`~ssl_lightning.losses.ibot.ibot_patch_loss`) pairs each masked global crop's patch
    outputs with the teacher's targets for the same crop, on the masked patches only; KoLeo
    (:func:`~ssl_lightning.losses.koleo.koleo_loss`, DINOv2) spreads the student's [CLS] features of each
    global crop, on each rank's own images. Logged: ``loss/cls``, ``loss/patch``, and ``loss/koleo``
    (the sum over the two crops) when ``koleo_weight`` > 0.

    DINOv2's additions: ``koleo_weight`` 0.1; ``centering: sinkhorn_knopp`` (the [CLS] targets over the
    global batch, the patch targets over its masked patches); ``shared_head: false`` (separate [CLS] and
    patch heads of the same widths, ``patch_out_dim`` outputs; DINOv2's ViT-L/g); ``teacher_temp_per_step``
    (DINOv2 warms the temperature up per iteration, one value for both tokens: leave the patch
    temperatures None); the masking itself is DINOv2's (iBOT draws the same distribution per crop, not
    stratified over the batch); DINOv2's running patch centre (``centering: centering``) follows the masked
    teacher patches only, iBOT's (here) all of them. DINOv2's other defaults differ from iBOT's ViT-S: 65,536 outputs, EMA
    momentum 0.992, LR 4e-3 per 1,024 images scaled by the square root, layer-wise LR decay 0.9.

    ``feats`` (the online probe's) are the student's features of the first global crop, masked when
    that crop is; ``embed`` (validation, kNN) sees whole images. Departures, beside DINO's (no stochastic
    depth, the teacher's copy would drop paths too): iBOT's ``shared_head: false`` shares the MLP and
    splits only the last layer, here the patch head is a whole DINO head of its own (DINOv2's); the
    mask token is a parameter of the method, not of the ViT (so checkpoints export as a plain timm ViT),
    decayed as in the official code and clipped on its own; smallest mask block 4 patches (DINOv2; iBOT
    (min(H, W) // 3)^2, also 4 on CIFAR's 8 x 8 grid). timm ViTs only (``VisionTransformer``); a
    backbone without patch tokens is refused.

    Args:
        shared_head: one head for the [CLS] and patch tokens (iBOT's ViT-S); False: separate heads.
        patch_out_dim: the patch head's outputs with separate heads (None: ``out_dim``).
        mask_ratio_range: the range of a masked crop's fraction of masked patches.
        mask_probability: the fraction of global crops masked.
        patch_loss_weight: the patch loss's weight (iBOT's ``lambda2``).
        koleo_weight: KoLeo's weight (0: off; DINOv2: 0.1).
        teacher_patch_temp, warmup_teacher_patch_temp: the patch targets' temperature after and at the
            start of the warm-up (iBOT's ``teacher_patch_temp``; None: the [CLS] ones).
        teacher_temp_per_step: warm the teacher temperatures up per optimizer step (DINOv2) rather
            than per epoch (DINO, iBOT), over ``warmup_teacher_temp_epochs`` of steps (at most the run's).
        out_dim, proj_hidden_dim, bottleneck_dim, norm_last_layer, use_bn_in_head, backbone: as :class:`DINO`,
            with iBOT's ViT-S values (the widths of both heads); BatchNorm in the head is refused (it would mix
            [CLS] and patch statistics).
        **kwargs: :class:`DINO`'s arguments (temperatures, centring, momentum, clipping, optimizer).
    """

    def __init__(
        self,
        shared_head: bool = True,
        patch_out_dim: int | None = None,
        mask_ratio_range: tuple[float, float] = (0.1, 0.5),
        mask_probability: float = 0.5,
        patch_loss_weight: float = 1.0,
        koleo_weight: float = 0.0,
        teacher_patch_temp: float | None = None,
        warmup_teacher_patch_temp: float | None = None,
        teacher_temp_per_step: bool = False,
        out_dim: int = 8192,
        proj_hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        norm_last_layer: bool = False,
        use_bn_in_head: bool = False,
        backbone: str | nn.Module = "vit_small_patch16_224",
        **kwargs: Any,
    ):
        low, high = mask_ratio_range
        if not 0.0 <= low <= high < 1.0 or not 0.0 <= mask_probability <= 1.0:
            raise ValueError(
                f"IBOT needs 0 <= mask_ratio_range[0] <= mask_ratio_range[1] < 1 and 0 <= mask_probability <= 1; got "
                f"{tuple(mask_ratio_range)} and {mask_probability} (iBOT and DINOv2: (0.1, 0.5) and 0.5)."
            )
        if patch_loss_weight < 0 or koleo_weight < 0:
            raise ValueError(f"IBOT needs patch_loss_weight >= 0 and koleo_weight >= 0, got {patch_loss_weight} "
                             f"and {koleo_weight}")
        if use_bn_in_head:
            raise ValueError("IBOT runs its head on [CLS] and patch tokens alike; set use_bn_in_head: false.")
        if shared_head and patch_out_dim is not None:
            raise ValueError(f"IBOT: patch_out_dim={patch_out_dim} sizes a separate patch head; set shared_head: false "
                             "or leave patch_out_dim unset (a shared head has out_dim outputs).")
        super().__init__(out_dim=out_dim, proj_hidden_dim=proj_hidden_dim, bottleneck_dim=bottleneck_dim,
                         norm_last_layer=norm_last_layer, use_bn_in_head=use_bn_in_head, backbone=backbone, **kwargs)
        self._temp_warmup_steps: int | None = None  # set at the start of fit with teacher_temp_per_step

    def build_heads(self, feat_dim: int) -> None:
        hp = self.hparams
        name = hp.backbone if isinstance(hp.get("backbone"), str) else type(self.backbone).__name__
        vit = check_patch_tokens(self.backbone, type(self).__name__, name)
        if type(vit) not in (VisionTransformer, MaskTokenVisionTransformer) or not isinstance(vit.patch_drop, nn.Identity):
            raise ValueError(
                f"IBOT runs timm's VisionTransformer with a mask token; the backbone {name!r} is a {type(vit).__name__}"
                " (or drops patches, patch_drop_rate). Use a vit_* or (not distilled) deit_* model without patch drop."
            )
        vit.__class__ = MaskTokenVisionTransformer  # in place: the same module, parameters and names
        # in the method, not the ViT: the backbone's state dict stays a plain timm ViT's
        self.mask_token = nn.Parameter(torch.zeros(1, vit.embed_dim))
        self.projector = DINOHead(feat_dim, hp.out_dim, hp.proj_hidden_dim, hp.bottleneck_dim,
                                  norm_last_layer=hp.norm_last_layer)
        patch_dim = hp.out_dim if hp.shared_head else hp.patch_out_dim or hp.out_dim
        self.patch_projector = None if hp.shared_head else DINOHead(
            feat_dim, patch_dim, hp.proj_hidden_dim, hp.bottleneck_dim, norm_last_layer=hp.norm_last_layer)
        self.teacher = EMATeacher(self._online_network(), hp.base_momentum, hp.final_momentum)
        if hp.centering == "centre":  # buffers: checkpointed, so a resumed run keeps its centres
            self.register_buffer("centre", torch.zeros(1, hp.out_dim))
            self.register_buffer("patch_centre", torch.zeros(1, patch_dim))

    def _online_network(self) -> IBOTNetwork:
        # what the teacher mirrors: the backbone and the heads (not the mask token, which it never uses)
        return IBOTNetwork(self.backbone, self.projector, self.patch_projector)

    def parameter_groups(self) -> list[dict]:
        groups = super().parameter_groups()
        next(group for group in groups if group["name"] == "weights")["params"].append(self.mask_token)
        return groups

    def on_train_start(self) -> None:
        super().on_train_start()
        if self.hparams.teacher_temp_per_step:
            self._temp_warmup_steps = resolve_warmup_steps(
                self.hparams.warmup_teacher_temp_epochs, None, self.trainer, int(self.trainer.estimated_stepping_batches))

    def _temperature(self, warmup: float, final: float) -> float:
        if self._temp_warmup_steps is not None:  # DINOv2: np.linspace over the warm-up's iterations
            return teacher_temperature(self.global_step, warmup, final, self._temp_warmup_steps)
        return teacher_temperature(self.current_epoch, warmup, final, self.hparams.warmup_teacher_temp_epochs)

    def teacher_temp_now(self) -> float:
        return self._temperature(self.hparams.warmup_teacher_temp, self.hparams.teacher_temp)

    def teacher_patch_temp_now(self) -> float:
        hp = self.hparams
        warmup = hp.warmup_teacher_temp if hp.warmup_teacher_patch_temp is None else hp.warmup_teacher_patch_temp
        return self._temperature(warmup, hp.teacher_temp if hp.teacher_patch_temp is None else hp.teacher_patch_temp)

    def draw_masks(self, crops: torch.Tensor) -> BlockMasks:
        """Masks for the [C, ...] global crops, drawn on the host (global RNG) and copied to their device."""
        hp = self.hparams
        grid = self.backbone.patch_embed.dynamic_feat_size(tuple(crops.shape[-2:]))
        masks = ibot_block_masks(crops.shape[0], grid, hp.mask_ratio_range, hp.mask_probability)
        if crops.device.type == "cuda":  # from pinned memory the copy is asynchronous: the host does not wait
            masks = BlockMasks(*(tensor.pin_memory() for tensor in masks))
        return BlockMasks(*(tensor.to(crops.device, non_blocking=True) for tensor in masks))

    def shared_step(self, batch: dict) -> dict:
        hp = self.hparams
        views = batch["views"]
        crops = torch.cat(global_views(views, NUM_GLOBAL_CROPS, type(self).__name__))
        num_images = views[0].shape[0]
        masks = self.draw_masks(crops)
        student = self._online_network()(crops, masks.mask, self.mask_token)
        teacher = self.teacher(crops)
        cls_logits = student.cls_logits
        if len(views) > NUM_GLOBAL_CROPS:  # local crops: [CLS] only, unmasked, one pass per crop size
            cls_logits = torch.cat([cls_logits, self.projector(forward_per_resolution(self.backbone, views[NUM_GLOBAL_CROPS:]))])

        centre, patch_centre = (self.centre, self.patch_centre) if hp.centering == "centre" else (None, None)
        teacher_cls = teacher.cls_logits.view(NUM_GLOBAL_CROPS, num_images, -1)
        cls_targets = dino_teacher_targets(teacher_cls, self.teacher_temp_now(), hp.centering, centre,
                                           hp.sinkhorn_iterations)
        cls_loss = dino_loss(cls_logits.view(len(views), num_images, -1), cls_targets, hp.student_temp)
        positions = masks.positions if hp.centering == "sinkhorn_knopp" else None
        patch_targets = ibot_patch_targets(teacher.patch_logits, self.teacher_patch_temp_now(), hp.centering,
                                           patch_centre, positions, hp.sinkhorn_iterations)
        patch_loss = ibot_patch_loss(student.patch_logits, patch_targets, masks.mask, hp.student_temp)
        out = {"loss/cls": cls_loss, "loss/patch": patch_loss}
        loss = cls_loss + hp.patch_loss_weight * patch_loss
        if hp.koleo_weight > 0:  # DINOv2: per global crop, never between two crops of one image
            out["loss/koleo"] = sum(koleo_loss(feats) for feats in student.feats.chunk(NUM_GLOBAL_CROPS))
            loss = loss + hp.koleo_weight * out["loss/koleo"]
        if centre is not None:  # after the targets: this batch is centred by the earlier ones
            self.centre.copy_(dino_centre_update(self.centre, teacher.cls_logits, hp.centre_momentum))
            self.patch_centre.copy_(dino_centre_update(self.patch_centre, teacher.patch_logits, hp.centre_momentum))
        return {"loss": loss, **out, "feats": student.feats[:num_images]}

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        super().on_before_optimizer_step(optimizer)  # DINO's: the [CLS] head's last layer, clipping
        hp = self.hparams
        if self.patch_projector is not None and self.current_epoch < hp.freeze_last_layer:
            for parameter in self.patch_projector.last_layer.parameters():  # iBOT freezes every last layer
                parameter.grad = None
        if hp.clip_grad:  # per parameter, so clipping it apart from the network is the same
            clip_gradients_per_parameter([self.mask_token], hp.clip_grad, self.trainer)


class MaskTokenVisionTransformer(VisionTransformer):
    """timm's ``VisionTransformer`` whose ``forward`` can also replace patch embeddings by a mask token and
    return the patch tokens (iBOT's ``prepare_tokens`` with ``mask_model``, DINOv2's
    ``prepare_tokens_with_masks``). IBOT makes its backbone one in place (``__class__``; nothing is added),
    so export sees a plain timm ViT. The masked pass is ``forward`` itself because FSDP gathers a unit's
    parameters (the backbone is one) for its ``forward`` only."""

    def forward(self, x: torch.Tensor, masks: torch.Tensor | None = None, mask_token: torch.Tensor | None = None,
                return_patch_tokens: bool = False, **kwargs: Any):
        """timm's ``forward`` unless ``return_patch_tokens``: then the pooled features [N, D] and the patch
        tokens [N, L, D] after the final norm, with ``mask_token`` ([1, D]) in place of the patch embedding
        wherever ``masks`` ([N, L] bool, patch order) is True, before the position embeddings are added."""
        if not return_patch_tokens:
            return super().forward(x, **kwargs)
        tokens = self.patch_embed(x)  # [N, L, D], or [N, H, W, D] with dynamic_img_size
        if masks is not None:
            if masks.shape != (tokens.shape[0], math.prod(tokens.shape[1:-1])):
                raise ValueError(f"masks of shape {tuple(masks.shape)} for {tuple(tokens.shape[:-1])} patch tokens")
            tokens = torch.where(masks.view(*tokens.shape[:-1], 1), mask_token.to(tokens.dtype), tokens)
        tokens = self.norm_pre(self.patch_drop(self._pos_embed(tokens)))
        tokens = checkpoint_seq(self.blocks, tokens) if self.grad_checkpointing else self.blocks(tokens)
        tokens = self.norm(tokens)
        return self.forward_head(tokens, pre_logits=True), tokens[:, self.num_prefix_tokens:]
