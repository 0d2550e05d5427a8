"""What MAE promises beyond its family: the official random masking, the encoder on the visible
patches only (the official forward_encoder), the decoder's un-shuffle and mask tokens, the fixed sin-cos
position embeddings, the loss wiring, the probe's features of the unmasked image, MAE's optimizer
defaults, one view, the error for a backbone without patch tokens, and a checkpoint that exports and
fine-tunes with FineTune."""

import json
import math

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file

from ssl_lightning.cli import main
from ssl_lightning.components.heads import MAEDecoder, sincos_position_embedding
from ssl_lightning.components.masking import gather_tokens, num_visible_patches, random_masking
from ssl_lightning.datamodules import Digits, ViewSpec
from ssl_lightning.evaluation import FineTune
from ssl_lightning.losses.mae import mae_loss, patchify
from ssl_lightning.methods.ssl import mae as mae_module
from ssl_lightning.methods.ssl.mae import MAE

from helpers.fakes import fake_loader, quick_trainer

#: the tiniest ViT that has every part: 16-px images, patch 4 (16 tokens), width 32, 2 heads, 2 blocks
TINY_VIT = {"backbone": "vit_tiny_patch16_224",
            "backbone_kwargs": {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}}
TINY_DECODER = {"decoder_embed_dim": 16, "decoder_depth": 1, "decoder_num_heads": 2}
#: MAE's one view: a random resized crop (scale 0.2-1) and a flip, no colour
MAE_VIEW = [ViewSpec(crop_scale=(0.2, 1.0), jitter_p=0.0, grayscale_p=0.0)]


def tiny_mae(vit=None, **kwargs):
    defaults = {"in_chans": 1, "num_classes": 4, "batch_size": 8, **TINY_DECODER}
    model = MAE(**(vit or TINY_VIT), **{**defaults, **kwargs})
    model.configure_model()
    return model


def one_view_batch(num_images=4, size=16, seed=0):
    images = torch.randn(num_images, 1, size, size, generator=torch.Generator().manual_seed(seed))
    return {"views": [images], "label": torch.arange(num_images) % 4, "index": torch.arange(num_images)}


# ---------------------------------------------------------------- masking


def test_random_masking_keeps_the_lowest_noise_patches_in_noise_order_as_the_official_code():
    torch.manual_seed(0)
    noise = torch.rand(5, 16)
    torch.manual_seed(0)
    mask = random_masking(5, 16, 0.75)
    assert num_visible_patches(16, 0.75) == 4 and mask.ids_keep.shape == (5, 4)
    for n in range(5):
        order = sorted(range(16), key=lambda patch: float(noise[n, patch]))
        assert mask.ids_keep[n].tolist() == order[:4]  # the kept patches, ascending noise: a random order
        assert mask.mask[n].tolist() == [0.0 if patch in order[:4] else 1.0 for patch in range(16)]
    # ids_restore puts [kept..., masked...] back in patch order
    shuffled = torch.argsort(noise, dim=1)
    assert torch.equal(torch.gather(shuffled, 1, mask.ids_restore), torch.arange(16).expand(5, 16))
    assert mask.mask.dtype == torch.float32 and mask.mask.sum(dim=1).tolist() == [12.0] * 5


def test_masks_differ_between_images_and_gather_tokens_picks_rows():
    mask = random_masking(64, 16, 0.75, generator=torch.Generator().manual_seed(0))
    assert len({tuple(row.tolist()) for row in mask.mask}) > 1
    tokens = torch.randn(2, 5, 3)
    ids = torch.tensor([[4, 0], [2, 2]])
    picked = gather_tokens(tokens, ids)
    assert torch.equal(picked, torch.stack([tokens[0, [4, 0]], tokens[1, [2, 2]]]))


def test_a_mask_ratio_that_keeps_nothing_is_refused():
    with pytest.raises(ValueError, match="keeps no patch of 4"):
        random_masking(2, 4, 0.8)
    with pytest.raises(ValueError, match="0 <= mask_ratio < 1"):
        random_masking(2, 4, 1.0)


# ---------------------------------------------------------------- position embeddings


def official_sincos(dim, rows, columns):
    """facebookresearch/mae util/pos_embed.py in NumPy, for an h x w grid: the first half encodes the column."""
    def one_axis(d, positions):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", positions.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_w, grid_h = np.meshgrid(np.arange(columns, dtype=np.float32), np.arange(rows, dtype=np.float32))
    return np.concatenate([one_axis(dim // 2, grid_w), one_axis(dim // 2, grid_h)], axis=1)


@pytest.mark.parametrize(("dim", "grid", "prefix"), [(16, (4, 4), 1), (32, (3, 5), 0), (8, (2, 2), 2)])
def test_sincos_position_embedding_is_the_official_one_with_zero_prefix_rows(dim, grid, prefix):
    embedding = sincos_position_embedding(dim, grid, prefix)
    assert embedding.shape == (prefix + grid[0] * grid[1], dim) and embedding.dtype == torch.float32
    assert torch.equal(embedding[:prefix], torch.zeros(prefix, dim))
    np.testing.assert_allclose(embedding[prefix:].numpy(), official_sincos(dim, *grid), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_position_embedding(dim + 2, grid)


def test_the_encoder_position_embedding_is_a_fixed_sincos_buffer_that_exports_as_pos_embed():
    model = tiny_mae()
    vit = model.backbone
    assert "pos_embed" in dict(vit.named_buffers()) and "pos_embed" not in dict(vit.named_parameters())
    torch.testing.assert_close(vit.pos_embed[0], sincos_position_embedding(32, (4, 4), 1))
    assert "backbone.pos_embed" in model.state_dict()
    learned = tiny_mae(fixed_pos_embed=False).backbone
    assert "pos_embed" in dict(learned.named_parameters())  # the backbone's own, trained


# ---------------------------------------------------------------- encoder and decoder


def official_forward_encoder(vit, images, ids_keep):
    """The official forward_encoder, spelled out on the timm ViT's parts."""
    x = vit.patch_embed(images) + vit.pos_embed[:, 1:]
    x = gather_tokens(x, ids_keep)
    cls = (vit.cls_token + vit.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1)
    for block in vit.blocks:
        x = block(x)
    return vit.norm(x)


def test_the_encoder_sees_only_the_visible_patches_and_keeps_their_order():
    model = tiny_mae().eval()
    images = one_view_batch()["views"][0]
    mask = random_masking(4, 16, 0.75, generator=torch.Generator().manual_seed(1))
    calls = []
    model.backbone.blocks[0].register_forward_pre_hook(lambda _, inputs: calls.append(inputs[0].shape))
    tokens, pooled = model.backbone(images, ids_keep=mask.ids_keep)
    assert calls == [(4, 1 + 4, 32)]  # the class token and 4 of 16 patches
    torch.testing.assert_close(tokens, official_forward_encoder(model.backbone, images, mask.ids_keep))
    torch.testing.assert_close(pooled, tokens[:, 0])  # timm's token pooling: the class token


def test_with_nothing_masked_the_encoder_is_the_vit_forward_up_to_token_order():
    model = tiny_mae().eval()
    images = one_view_batch()["views"][0]
    mask = random_masking(4, 16, 0.0, generator=torch.Generator().manual_seed(2))
    tokens, _ = model.backbone(images, ids_keep=mask.ids_keep)
    full = model.backbone.forward_features(images)
    torch.testing.assert_close(tokens[:, 0], full[:, 0])
    torch.testing.assert_close(gather_tokens(tokens[:, 1:], mask.ids_restore), full[:, 1:])


def test_the_decoder_puts_visible_tokens_and_mask_tokens_back_in_patch_order():
    decoder = MAEDecoder(in_dim=8, patch_dim=12, grid_size=(2, 3), num_prefix_tokens=1, embed_dim=16, depth=1,
                         num_heads=2)
    mask = random_masking(2, 6, 0.5, generator=torch.Generator().manual_seed(3))
    tokens = torch.randn(2, 1 + 3, 8)
    seen = []
    decoder.blocks.register_forward_pre_hook(lambda _, inputs: seen.append(inputs[0]))
    pred = decoder(tokens, mask.ids_restore)
    assert pred.shape == (2, 6, 12)
    x, embedded, pos = seen[0], decoder.embed(tokens), sincos_position_embedding(16, (2, 3), 1)
    for n in range(2):
        torch.testing.assert_close(x[n, 0], embedded[n, 0] + pos[0])  # the class token, zero position
        for k, patch in enumerate(mask.ids_keep[n].tolist()):
            torch.testing.assert_close(x[n, 1 + patch], embedded[n, 1 + k] + pos[1 + patch])
        for patch in range(6):
            if mask.mask[n, patch] == 1:
                torch.testing.assert_close(x[n, 1 + patch], decoder.mask_token[0, 0] + pos[1 + patch])
    with pytest.raises(ValueError, match="4 patches per image do not fill a 2x3 grid"):
        decoder(tokens, torch.arange(4).expand(2, 4))


def test_images_of_another_size_get_their_own_grid_embedding_with_dynamic_img_size():
    vit = {"backbone": TINY_VIT["backbone"], "backbone_kwargs": {**TINY_VIT["backbone_kwargs"], "dynamic_img_size": True}}
    model = tiny_mae(vit)
    seen = []
    model.decoder.blocks.register_forward_pre_hook(lambda _, inputs: seen.append(inputs[0]))
    for size in (16, 24):  # 4 x 4 patches (the built grid), then 6 x 6
        out = model.shared_step(one_view_batch(size=size))
        assert torch.isfinite(out["loss"]) and seen[-1].shape == (4, 1 + (size // 4) ** 2, 16)
    # with nothing masked, the decoder's input minus its embedded tokens is the 6 x 6 grid's embedding
    images = one_view_batch(size=24)["views"][0]
    every = torch.arange(36).expand(4, 36)
    tokens, _ = model.backbone(images, ids_keep=every)
    model.decoder(tokens, every, (6, 6))
    expected = sincos_position_embedding(16, (6, 6), 1)
    torch.testing.assert_close(seen[-1] - model.decoder.embed(tokens), expected.expand(4, -1, -1))


def test_a_fresh_encoder_and_the_decoder_start_as_the_official_initialisation():
    model = tiny_mae()
    for module in (model.backbone, model.decoder):
        for name, layer in module.named_modules():
            if isinstance(layer, torch.nn.Linear):
                bound = math.sqrt(6 / (layer.in_features + layer.out_features))  # Xavier-uniform
                assert layer.weight.abs().max() <= bound and not layer.bias.any(), name
    weight = model.backbone.patch_embed.proj.weight
    assert weight.abs().max() <= math.sqrt(6 / (weight.shape[0] + weight[0].numel()))
    assert model.decoder.pos_embed.dtype == torch.float32 and "decoder.pos_embed" not in model.state_dict()


# ---------------------------------------------------------------- the step


def test_the_loss_is_mae_loss_on_the_masked_patches_of_the_one_view(monkeypatch):
    model = tiny_mae(num_classes=None)
    masks = []
    monkeypatch.setattr(mae_module, "random_masking", lambda *args: masks.append(random_masking(*args)) or masks[-1])
    batch = one_view_batch()
    torch.manual_seed(0)
    out = model.shared_step(batch)
    assert set(out) == {"loss"}  # no probe, no feats
    images, (mask,) = batch["views"][0], masks
    assert mask.ids_keep.shape == (4, 4)
    pred = model.decoder(model.backbone(images, ids_keep=mask.ids_keep)[0], mask.ids_restore)
    torch.testing.assert_close(out["loss"], mae_loss(pred, patchify(images, 4), mask.mask, norm_pix=True))
    out["loss"].backward()
    assert model.backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0 and model.decoder.mask_token.grad.any()


@pytest.mark.parametrize("probe_features", ["full", "visible"])
def test_the_probe_features_carry_no_gradient_and_the_full_ones_are_the_unmasked_images(probe_features):
    model = tiny_mae(probe_features=probe_features)
    batch = one_view_batch()
    torch.manual_seed(0)
    out = model.shared_step(batch)
    assert not out["feats"].requires_grad and out["feats"].shape == (4, 32)
    images = batch["views"][0]
    if probe_features == "full":  # timm's own forward on the unmasked images (no dropout in the tiny ViT)
        torch.testing.assert_close(out["feats"], model.backbone.forward_head(model.backbone.forward_features(images)))
    else:  # the masked pass's class token
        torch.manual_seed(0)
        mask = random_masking(4, 16, 0.75)
        torch.testing.assert_close(out["feats"], model.backbone(images, ids_keep=mask.ids_keep)[0][:, 0])
    embedded = model.embed(images)
    torch.testing.assert_close(embedded["feats"], model.backbone.forward_head(model.backbone.forward_features(images)))
    assert embedded["embeds"] is embedded["feats"]


def test_a_fit_uses_mae_optimizer_defaults_and_leaves_the_position_embedding_alone():
    model = tiny_mae(batch_size=16)
    fixed = model.backbone.pos_embed.clone()
    trainer = quick_trainer(max_epochs=2, limit_val_batches=0)
    trainer.fit(model, fake_loader(batch_size=16, length=32, size=16, num_views=1))
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, torch.optim.AdamW)
    groups = {group["name"]: group for group in optimizer.param_groups}
    assert groups["weights"]["weight_decay"] == 0.05 and tuple(groups["weights"]["betas"]) == (0.9, 0.95)
    assert groups["weights"]["initial_lr"] == pytest.approx(1.5e-4 * 16 / 256)
    grouped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert id(model.decoder.mask_token) in {id(p) for p in groups["weights"]["params"]}  # decayed, as the official
    assert grouped == {id(p) for p in model.parameters()}  # every parameter; pos_embed is none
    assert torch.equal(model.backbone.pos_embed, fixed)
    hp = model.hparams  # 40 warm-up epochs, then a cosine to 0
    assert (hp.warmup_epochs, hp.schedule, hp.min_lr_ratio, hp.lr_scaling) == (40.0, "warmup_cosine", 0.0, "linear")


def test_mae_takes_one_view():
    model = MAE(**TINY_VIT, **TINY_DECODER)
    with pytest.raises(ValueError, match="MAE"):
        quick_trainer(max_steps=1).fit(model, Digits(batch_size=8, num_workers=0, views="simclr"))


def test_a_backbone_without_patch_tokens_is_refused_by_name():
    model = MAE(backbone="resnet18", backbone_kwargs={"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64]},
                in_chans=1, **TINY_DECODER)
    with pytest.raises(ValueError, match=r"MAE masks patch tokens.*'resnet18' \(ResNet\) has no patch tokens"):
        model.configure_model()


def test_a_vit_subclass_with_its_own_forward_is_refused_by_name():
    distilled = {"backbone": "deit_tiny_distilled_patch16_224", "backbone_kwargs": TINY_VIT["backbone_kwargs"]}
    with pytest.raises(ValueError, match="'deit_tiny_distilled_patch16_224' is a VisionTransformerDistilled"):
        tiny_mae(distilled)


def test_a_vit_pooling_through_parameters_is_refused_and_one_without_them_is_taken():
    avg = {**TINY_VIT["backbone_kwargs"], "global_pool": "avg"}
    with pytest.raises(ValueError, match="fc_norm: false"):
        tiny_mae({"backbone": TINY_VIT["backbone"], "backbone_kwargs": avg})
    model = tiny_mae({"backbone": TINY_VIT["backbone"], "backbone_kwargs": {**avg, "fc_norm": False}})
    tokens, pooled = model.backbone(one_view_batch()["views"][0], ids_keep=torch.arange(4).expand(4, 4))
    torch.testing.assert_close(pooled, tokens[:, 1:].mean(dim=1))  # the patch tokens' mean


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"mask_ratio": 1.0}, "0 <= mask_ratio < 1"),
    ({"decoder_embed_dim": 18, "decoder_num_heads": 3}, "divisible by 4"),
    ({"probe_features": "cls"}, "probe_features must be one of"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MAE(**TINY_VIT, **{**TINY_DECODER, **kwargs})


# ---------------------------------------------------------------- export and fine-tuning


def test_a_short_fit_exports_and_fine_tunes_with_finetune(tmp_path):
    vit = {"backbone": "vit_tiny_patch16_224",
           "backbone_kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}}
    torch.manual_seed(0)
    model = MAE(**vit, **TINY_DECODER, warmup_epochs=0.0, lr=1e-3)
    trainer = quick_trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(model, Digits(batch_size=32, num_workers=0, views=MAE_VIEW))
    checkpoint = tmp_path / "mae.ckpt"
    trainer.save_checkpoint(checkpoint)
    model.eval()
    images = torch.randn(3, 1, 32, 32)

    out = tmp_path / "backbone.safetensors"
    main(["export", "--ckpt", str(checkpoint), "--out", str(out)])
    builder = json.loads(out.with_suffix(".json").read_text())["builder"]
    rebuilt = timm.create_model(builder["name"], num_classes=0, in_chans=1, **builder["kwargs"]).eval()
    rebuilt.load_state_dict(load_file(out), strict=True)  # pos_embed included, as timm's parameter
    torch.testing.assert_close(rebuilt(images), model.backbone(images))

    finetune = FineTune(pretrained=str(checkpoint), in_chans=1, num_classes=10, layer_decay=0.65)
    finetune.configure_model()
    for name, tensor in model.backbone.state_dict().items():
        assert torch.equal(finetune.backbone.state_dict()[name], tensor), name
    assert finetune.backbone.pos_embed.requires_grad  # fine-tuning trains it, as MAE's does
    trainer = quick_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=1, default_root_dir=tmp_path)
    trainer.fit(finetune, Digits(batch_size=32, num_workers=0, views="supervised"))
    assert {group["name"] for group in trainer.optimizers[0].param_groups} >= {"layer0_no_decay", "layer3"}
    assert not torch.equal(finetune.backbone.pos_embed, model.backbone.pos_embed)
    assert "val/finetune_top1" in trainer.callback_metrics
