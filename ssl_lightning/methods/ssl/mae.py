"""MAE (He et al., CVPR 2022, "Masked Autoencoders Are Scalable Vision Learners"): a ViT encoder sees a
random 25 % of each image's patches; a light decoder reconstructs the pixels of the other 75 %."""

from __future__ import annotations

from typing import Any, Literal

import torch
from timm.models import checkpoint_seq
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ssl_lightning.components.classifier_files import load_exactly, read_state_dict
from ssl_lightning.components.heads import MAEDecoder, sincos_position_embedding
from ssl_lightning.components.masking import check_patch_tokens, gather_tokens, random_masking
from ssl_lightning.export import PREFIX, backbone_state_dict, load_checkpoint
from ssl_lightning.losses.mae import mae_loss, patchify
from ssl_lightning.methods.ssl.base import SSLMethod

#: AdamW's betas in MAE's pre-training (``main_pretrain.py``); a lower beta2 than torch's 0.999
MAE_BETAS = [0.9, 0.95]
PROBE_FEATURES = ("full", "visible")
DECODER_PREFIX = "decoder."
#: timm's ViT classifier: in a weights file, not part of the encoder MAE trains (its backbone has no head)
TIMM_VIT_CLASSIFIER = "head."


class MAE(SSLMethod):
    """MAE with the paper's defaults (facebookresearch/mae ``models_mae.py``, ``main_pretrain.py``,
    PRETRAIN.md): mask ratio 0.75, random per image (:func:`~ssl_lightning.components.masking.random_masking`);
    the encoder, a timm ViT (the ``backbone``), runs on the visible patches only, with fixed 2-D
    sin-cos position embeddings; a :class:`~ssl_lightning.components.heads.MAEDecoder` of 8 blocks,
    width 512 and 16 heads predicts every patch's pixels; the loss
    (:func:`~ssl_lightning.losses.mae.mae_loss`) is the mean squared error on the masked patches, against
    per-patch normalised pixels (``norm_pix_loss``). AdamW with betas (0.9, 0.95), LR 1.5e-4 per 256
    images, weight decay 0.05, 40 warm-up epochs and a cosine to 0. One view per image: a random
    resized crop (scale 0.2-1) and a flip in the paper. The default backbone is ViT-B/16, the
    smallest the paper reports.

    The encoder is the method's ``backbone`` module, timm's ``VisionTransformer`` itself, made a
    :class:`MaskedVisionTransformer` in place (the same parameters and names; its ``forward`` also runs
    on the kept patches only), so checkpoints carry it under ``backbone.``: ``export`` and
    :class:`~ssl_lightning.evaluation.FineTune` (layer-wise LR decay: MAE fine-tunes ViT-B with 0.65)
    load it into a plain timm ViT, which trains the position embedding from its sin-cos values, as
    MAE's fine-tuning does. A backbone without patch tokens (a ResNet) is refused, as are ViTs whose
    pooling has parameters (``fc_norm``, attention pooling), which reconstruction would leave
    untrained. A freshly built backbone is initialised as the official encoder: Xavier-uniform linear
    and patch-embedding weights, zero biases, the class token normal (std 0.02).

    ``fixed_pos_embed`` replaces the ViT's learned position embedding by the fixed sin-cos one (zero
    for the class token), stored as a buffer under the same name, so it is not trained but exports
    as timm's ``pos_embed``; set it False to keep and train the backbone's own (a pretrained ViT
    given as a module, whose embedding would otherwise be overwritten).

    ``feats``, which the online probe trains on, are timm's pooled features (the class token, or
    whatever ``global_pool`` says) of the *unmasked* image, computed without gradient
    (``probe_features="full"``): what validation and the kNN monitor see. That is one more encoder
    pass on all L tokens (the CIFAR recipe's step took 1.5x as long with it, on a CPU), run only
    when the probe exists (``num_classes`` set). ``"visible"`` pools the masked pass's output
    instead, for free, but trains the probe on features of a quarter of each image. ``embed`` gives
    the features as both ``feats`` and ``embeds``: MAE has no projector.

    Starting from trained weights (further pre-training, Lee et al., ICLR 2023, "Self-Distillation for
    Further Pre-training of Transformers": MAE continued on the target data from a pre-trained MAE):
    ``init_ckpt`` is one of our MAE checkpoints (written by ``fit`` of ``MAE`` or a subclass), whose
    backbone *and* decoder are loaded, so the whole autoencoder goes on training (the online probe and
    any teacher in it are not); ``init_weights`` is a timm ViT's state dict in a local file
    (``.safetensors``, or ``.pth``/``.pt``/``.bin`` read with ``weights_only=True``; a ``state_dict`` or
    ``model`` wrapper and a ``module.`` prefix are removed, timm's classifier ``head.*`` is dropped), e.g.
    the official ``mae_pretrain_vit_base.pth`` or an ``export`` of one of our backbones: the encoder
    only, the decoder starts fresh. Both load strictly when the model is built (``configure_model``,
    before the optimizer exists), after the fresh initialisation, so the file's position embedding
    replaces the sin-cos one (still fixed with ``fixed_pos_embed``: as MAE's, not trained); weights of
    another architecture (other backbone, backbone_kwargs, decoder sizes or channels) stop with an error
    naming a few missing, unexpected and reshaped keys. A resumed ``fit`` builds the model (reading the
    file again: it must still exist) before Lightning restores the checkpoint, whose weights then replace
    the initial ones; ``load_from_checkpoint`` builds the model without them, reading no initial file.

    Departures: timm's ViT leaves its class token undecayed (``no_weight_decay``; the official code
    decays it; the mask token is decayed in both); the random resized crop interpolates bilinearly
    (the official one bicubically).

    Args:
        mask_ratio: fraction of each image's patches hidden from the encoder.
        decoder_embed_dim, decoder_depth, decoder_num_heads, decoder_mlp_ratio: the decoder's width,
            blocks, heads and MLP ratio.
        norm_pix_loss: regress each patch's normalised pixels (mean 0, variance 1 over the patch).
        fixed_pos_embed: fixed 2-D sin-cos position embedding in the encoder (the official one).
        probe_features: "full" or "visible" (see above).
        optimizer, lr, weight_decay, warmup_epochs: MAE's optimisation (see :class:`TrainModule`).
        optimizer_kwargs: None gives MAE's betas (0.9, 0.95) to the Adam-type optimizers; a dict is
            passed to the optimizer as given.
        backbone: a timm ViT name (or module); ``backbone_kwargs`` sets img_size and patch_size.
        init_ckpt: an MAE checkpoint to start from (backbone and decoder), or None.
        init_weights: a timm ViT state dict file to start the encoder from, or None (not with ``init_ckpt``).
        **kwargs: backbone, optimizer and schedule arguments of :class:`SSLMethod`.
    """

    expected_views = 1

    def __init__(
        self,
        mask_ratio: float = 0.75,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        decoder_mlp_ratio: float = 4.0,
        norm_pix_loss: bool = True,
        fixed_pos_embed: bool = True,
        probe_features: Literal["full", "visible"] = "full",
        optimizer: Literal["lars", "sgd", "adamw", "lamb", "adamp", "adam"] = "adamw",
        lr: float = 1.5e-4,
        weight_decay: float = 0.05,
        warmup_epochs: float = 40.0,
        optimizer_kwargs: dict[str, Any] | None = None,
        backbone: str | nn.Module = "vit_base_patch16_224",
        init_ckpt: str | None = None,
        init_weights: str | None = None,
        **kwargs: Any,
    ):
        name = type(self).__name__
        if init_ckpt is not None and init_weights is not None:
            raise ValueError(
                f"{name}: give one of init_ckpt={init_ckpt!r} (an MAE checkpoint: encoder and decoder) and "
                f"init_weights={init_weights!r} (a timm ViT state dict: the encoder alone), not both."
            )
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"MAE needs 0 <= mask_ratio < 1, got {mask_ratio}")
        if probe_features not in PROBE_FEATURES:
            raise ValueError(f"MAE: probe_features must be one of {', '.join(PROBE_FEATURES)}, got {probe_features!r}")
        if decoder_embed_dim % 4 or decoder_embed_dim % decoder_num_heads:
            raise ValueError(
                f"MAE: decoder_embed_dim ({decoder_embed_dim}) must be divisible by 4 (the 2-D sin-cos position "
                f"embedding) and by decoder_num_heads ({decoder_num_heads})"
            )
        if optimizer_kwargs is None and optimizer in ("adamw", "adam", "adamp", "lamb"):
            optimizer_kwargs = {"betas": list(MAE_BETAS)}  # recorded so in the hyperparameters
        super().__init__(optimizer=optimizer, lr=lr, weight_decay=weight_decay, warmup_epochs=warmup_epochs,
                         optimizer_kwargs=optimizer_kwargs, backbone=backbone, **kwargs)

    def build_heads(self, feat_dim: int) -> None:
        hp = self.hparams
        name = hp.backbone if isinstance(hp.get("backbone"), str) else type(self.backbone).__name__
        vit = check_patch_tokens(self.backbone, type(self).__name__, name)
        height, width = vit.patch_embed.patch_size
        if height != width:
            raise ValueError(f"MAE needs square patches, but the backbone {name!r} has {height}x{width} patches")
        if type(vit) not in (VisionTransformer, MaskedVisionTransformer):
            raise ValueError(
                f"MAE runs timm's VisionTransformer on the visible patches; the backbone {name!r} is a "
                f"{type(vit).__name__}, whose forward may differ. Use a vit_* or (not distilled) deit_* model."
            )
        if not isinstance(vit.fc_norm, nn.Identity) or vit.attn_pool is not None:
            raise ValueError(
                f"MAE: the backbone {name!r} pools through layers with parameters (fc_norm or attention pooling), "
                "which reconstruction does not train; use global_pool 'token' (timm's default) or "
                "backbone_kwargs {global_pool: avg, fc_norm: false}."
            )
        if self._custom_backbone is None:  # a given module keeps its weights
            init_encoder_like_mae(vit)
        if hp.fixed_pos_embed:
            use_fixed_position_embedding(vit, name)
        vit.__class__ = MaskedVisionTransformer  # in place: the same module, parameters and names
        self.patch_size = height
        self.decoder = MAEDecoder(
            vit.embed_dim, height * width * vit.patch_embed.proj.in_channels, vit.patch_embed.grid_size,
            vit.num_prefix_tokens, hp.decoder_embed_dim, hp.decoder_depth, hp.decoder_num_heads, hp.decoder_mlp_ratio,
        )
        self.load_initial_weights()

    def load_initial_weights(self) -> None:
        """``init_ckpt``'s backbone and decoder, or ``init_weights`` into the backbone (strictly), if given."""
        hp, owner = self.hparams, type(self).__name__
        if hp.get("init_ckpt") is not None:
            checkpoint = read_method_checkpoint(owner, "init_ckpt", hp.init_ckpt)
            source = f"init_ckpt={hp.init_ckpt}"
            decoder = {key[len(DECODER_PREFIX):]: value for key, value in checkpoint["state_dict"].items()
                       if key.startswith(DECODER_PREFIX)}
            if not decoder:
                raise ValueError(
                    f"{owner}: {source} has no MAE decoder ('{DECODER_PREFIX}' entries): it is the checkpoint of "
                    f"{trained_as(checkpoint)}, not of MAE. To start the encoder alone from it, export its backbone "
                    f"(python -m ssl_lightning export --ckpt {hp.init_ckpt} --out backbone.safetensors) and pass "
                    "that file as init_weights."
                )
            load_exactly(owner, "initial", self.backbone, backbone_state_dict(checkpoint), self.describe_backbone(),
                         f"{source} ('{PREFIX}' entries of {trained_as(checkpoint)})")
            load_exactly(owner, "initial", self.decoder, decoder,
                         f"this {owner}'s decoder (decoder_embed_dim {hp.decoder_embed_dim}, decoder_depth "
                         f"{hp.decoder_depth}, decoder_num_heads {hp.decoder_num_heads})",
                         f"{source} ('{DECODER_PREFIX}' entries)")
        elif hp.get("init_weights") is not None:
            weights = read_state_dict(owner, hp.init_weights, "init_weights")
            weights = {key: value for key, value in weights.items() if not key.startswith(TIMM_VIT_CLASSIFIER)}
            load_exactly(owner, "initial", self.backbone, weights, self.describe_backbone(),
                         f"init_weights={hp.init_weights}")

    def describe_backbone(self) -> str:
        """This method's encoder architecture, for errors about weights that do not fit it."""
        hp = self.hparams
        if self._custom_backbone is not None:
            return f"this {type(self).__name__}'s backbone (a {type(self._custom_backbone).__name__} given in Python)"
        return f"this {type(self).__name__}'s backbone ({hp.backbone} with backbone_kwargs {hp.backbone_kwargs or {}})"

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any):
        """Lightning's ``load_from_checkpoint``, building the model without its initial weights (the
        checkpoint's replace them), so the initial file need not exist; pass ``init_ckpt`` or
        ``init_weights`` to read one anyway."""
        kwargs.setdefault("init_ckpt", None)
        kwargs.setdefault("init_weights", None)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def embed(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.backbone(images)
        return {"feats": feats, "embeds": feats}

    def masked_reconstruction(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """MAE's loss on ``images`` (a new random mask per image) and the masked pass's pooled features."""
        hp = self.hparams
        patches = patchify(images, self.patch_size)
        mask = random_masking(images.shape[0], patches.shape[1], hp.mask_ratio, images.device)
        tokens, pooled = self.backbone(images, ids_keep=mask.ids_keep)  # the encoder on the visible patches
        grid_size = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
        pred = self.decoder(tokens, mask.ids_restore, grid_size)
        return mae_loss(pred, patches, mask.mask, hp.norm_pix_loss), pooled

    def shared_step(self, batch: dict) -> dict:
        hp = self.hparams
        images = batch["views"][0]
        loss, pooled = self.masked_reconstruction(images)
        if self.probe is None:  # no probe, no use for feats: skip the extra pass
            return {"loss": loss}
        if hp.probe_features == "visible":
            feats = pooled.detach()
        else:
            with torch.no_grad():
                feats = self.backbone(images)
        return {"loss": loss, "feats": feats}


def read_method_checkpoint(owner: str, argument: str, path: str) -> dict:
    """One of our method checkpoints (``export.load_checkpoint``: ``weights_only=True``, a backbone), or
    an error naming the argument that gave it."""
    try:
        return load_checkpoint(path)
    except (ValueError, FileNotFoundError) as error:
        raise type(error)(f"{owner}: {argument}: {error}") from None


def trained_as(checkpoint: dict) -> str:
    """The method and backbone a checkpoint was trained with, in words (for errors)."""
    hparams = checkpoint.get("hyper_parameters") or {}
    method = str(hparams.get("_class_path", "a method")).rsplit(".", 1)[-1]  # recorded by the CLI only
    backbone = hparams.get("backbone", "a backbone given in Python")
    return f"{method} with {backbone}, backbone_kwargs {hparams.get('backbone_kwargs') or {}}"


class MaskedVisionTransformer(VisionTransformer):
    """timm's ``VisionTransformer`` whose ``forward`` also runs MAE's encoder (the official
    ``forward_encoder``) on the visible patches. MAE turns its backbone into one in place
    (``__class__``; no parameter or buffer is added), and export rebuilds a plain timm ViT with the
    same weights. The masked pass is ``forward`` itself, not a function calling the ViT's parts,
    because FSDP gathers a unit's parameters (the backbone is one) for its ``forward`` only; and so
    ``compile`` compiles it too.
    """

    def forward(self, x: torch.Tensor, ids_keep: torch.Tensor | None = None, **kwargs: Any):
        """timm's ``forward`` without ``ids_keep``. With ``ids_keep`` ([N, K], the visible patches in
        the order the encoder sees them, ``components.masking.PatchMask``): the tokens ``[N, P + K, D]``
        after the final norm, the P prefix tokens then the K kept patches, and their pooled features
        ``[N, D]``. Position embeddings are added before the masking (timm's own ``_pos_embed``, so
        class and register tokens, ``no_embed_class`` and ``dynamic_img_size`` behave as in
        ``forward``); timm's ``patch_drop`` is left out (the masking is MAE's patch dropout)."""
        if ids_keep is None:
            return super().forward(x, **kwargs)
        tokens = self._pos_embed(self.patch_embed(x))
        prefix = self.num_prefix_tokens
        tokens = torch.cat([tokens[:, :prefix], gather_tokens(tokens[:, prefix:], ids_keep)], dim=1)
        tokens = self.norm_pre(tokens)
        tokens = checkpoint_seq(self.blocks, tokens) if self.grad_checkpointing else self.blocks(tokens)
        tokens = self.norm(tokens)
        return tokens, self.forward_head(tokens, pre_logits=True)


@torch.no_grad()
def init_encoder_like_mae(vit: VisionTransformer) -> None:
    """The official encoder's initialisation (``initialize_weights``, "following official JAX ViT"):
    linear weights Xavier-uniform, the patch embedding's too (as a linear map of the flattened
    patch), biases 0, LayerNorms (1, 0), the class (and register) tokens normal with std 0.02."""
    for module in vit.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    weight = vit.patch_embed.proj.weight
    nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
    for token in (vit.cls_token, vit.reg_token):
        if token is not None:
            nn.init.normal_(token, std=0.02)


def use_fixed_position_embedding(vit: VisionTransformer, name: str) -> None:
    """Replace the ViT's learned ``pos_embed`` parameter by a buffer of the same name and shape holding
    the fixed 2-D sin-cos embedding (zero rows for prefix tokens that have a position embedding)."""
    if vit.pos_embed is None:
        raise ValueError(f"MAE: the backbone {name!r} has no position embedding to fix; set fixed_pos_embed to false")
    prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
    fixed = sincos_position_embedding(vit.embed_dim, vit.patch_embed.grid_size, prefix)[None].to(vit.pos_embed.device)
    if fixed.shape != vit.pos_embed.shape:
        raise ValueError(
            f"MAE: the backbone {name!r} has a position embedding of shape {tuple(vit.pos_embed.shape)}, not the "
            f"{tuple(fixed.shape)} of its patch grid; set fixed_pos_embed to false"
        )
    del vit.pos_embed  # the learned parameter, which the optimizer would train and decay
    vit.register_buffer("pos_embed", fixed)
