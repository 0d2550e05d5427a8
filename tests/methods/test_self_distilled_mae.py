"""Further pre-training and self-distillation (Lee et al., ICLR 2023): MAE started from an MAE checkpoint (encoder
and decoder) or from a timm weights file (the encoder), strictly and once (a resumed run keeps its trained
weights); SelfDistilledMAE's student from those initial weights, its frozen teacher from the further
pre-trained checkpoint, and its loss MAE + weight x the distance of their unmasked representations."""

import shutil

import pytest
import timm
import torch
from safetensors.torch import save_file

from ssl_lightning.methods.ssl.mae import MAE
from ssl_lightning.methods.ssl.self_distilled_mae import SelfDistilledMAE

from helpers.fakes import fake_loader, quick_trainer

#: a two-block ViT on 16 px one-channel images (patch 4: 16 patches), width 32
VIT_KWARGS = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}
TINY = {"backbone": "vit_tiny_patch16_224", "backbone_kwargs": VIT_KWARGS, "decoder_embed_dim": 16,
        "decoder_depth": 1, "decoder_num_heads": 2, "in_chans": 1, "batch_size": 8, "num_classes": 4}


def built(cls=MAE, seed=0, **kwargs):
    torch.manual_seed(seed)
    model = cls(**{**TINY, **kwargs})
    model.configure_model()
    return model


def method_checkpoint(model, path):
    """What fit's checkpoint holds that the loaders read: the state dict and the hyperparameters."""
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, path)
    return str(path)


def loader():
    return fake_loader(batch_size=8, length=16, size=16, num_views=1, num_classes=4)


def assert_same_weights(module, reference):
    expected = reference.state_dict()
    assert module.state_dict().keys() == expected.keys()
    for key, value in module.state_dict().items():
        assert torch.equal(value, expected[key]), key


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """An initial MAE and a "further pre-trained" one (other weights, the same architecture), saved."""
    folder = tmp_path_factory.mktemp("mae")
    initial, further = built(seed=1), built(seed=2)
    return {"initial": initial, "further": further, "initial_ckpt": method_checkpoint(initial, folder / "initial.ckpt"),
            "further_ckpt": method_checkpoint(further, folder / "further.ckpt")}


# ---------------------------------------------------------------- MAE from given weights


def test_init_ckpt_continues_the_whole_autoencoder_but_not_the_probe(checkpoints):
    model = built(seed=3, init_ckpt=checkpoints["initial_ckpt"], num_classes=10)  # another class count: no probe read
    assert_same_weights(model.backbone, checkpoints["initial"].backbone)
    assert_same_weights(model.decoder, checkpoints["initial"].decoder)
    assert not torch.equal(model.backbone.blocks[0].attn.qkv.weight, built(seed=3).backbone.blocks[0].attn.qkv.weight)


@pytest.mark.parametrize("layout", ["pth with model wrapper and module. prefix", "safetensors"])
def test_init_weights_load_a_timm_file_into_the_encoder_and_leave_the_decoder_fresh(tmp_path, layout):
    torch.manual_seed(5)
    vit = timm.create_model("vit_tiny_patch16_224", in_chans=1, num_classes=10, **VIT_KWARGS)  # with its classifier
    weights = vit.state_dict()
    if layout == "safetensors":
        path = tmp_path / "vit.safetensors"
        save_file({key: value.contiguous() for key, value in weights.items()}, str(path))
    else:
        path = tmp_path / "vit.pth"
        torch.save({"model": {f"module.{key}": value for key, value in weights.items()}}, path)
    model = built(seed=6, init_weights=str(path))
    encoder = {key: value for key, value in weights.items() if not key.startswith("head.")}
    assert model.backbone.state_dict().keys() == encoder.keys()
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, encoder[key]), key
    assert "pos_embed" not in dict(model.backbone.named_parameters())  # the file's values, kept fixed
    assert_same_weights(model.decoder, built(seed=6).decoder)  # the draw a fresh MAE makes


def test_initial_weights_of_another_architecture_are_refused_naming_the_keys(checkpoints, tmp_path):
    with pytest.raises(ValueError, match=r"initial weights in init_ckpt=.*do not fit this MAE's backbone "
                                         r"\(vit_tiny_patch16_224 .*'depth': 3.*missing \(\d+\): blocks\.2\."):
        built(init_ckpt=checkpoints["initial_ckpt"], backbone_kwargs={**VIT_KWARGS, "depth": 3})
    with pytest.raises(ValueError, match=r"decoder_embed_dim 32.*other shape, file vs model \(\d+\): mask_token "
                                         r"\(1, 1, 16\) vs \(1, 1, 32\), embed\.weight \(16, 32\) vs \(32, 32\)"):
        built(init_ckpt=checkpoints["initial_ckpt"], decoder_embed_dim=32)
    wide = timm.create_model("vit_tiny_patch16_224", in_chans=3, num_classes=0, **VIT_KWARGS)
    torch.save(wide.state_dict(), tmp_path / "rgb.pth")
    with pytest.raises(ValueError, match=r"init_weights=.*rgb\.pth.*patch_embed\.proj\.weight \(32, 3, 4, 4\) vs "
                                         r"\(32, 1, 4, 4\)"):
        built(init_weights=str(tmp_path / "rgb.pth"))


def test_bad_initial_sources_are_named(checkpoints, tmp_path):
    with pytest.raises(ValueError, match="give one of init_ckpt=.* and init_weights=.*not both"):
        MAE(init_ckpt="a.ckpt", init_weights="b.pth")
    encoder_only = {key: value for key, value in checkpoints["initial"].state_dict().items()
                    if not key.startswith("decoder.")}
    torch.save({"state_dict": encoder_only, "hyper_parameters": {"backbone": "vit_tiny_patch16_224"}},
               tmp_path / "simclr.ckpt")
    with pytest.raises(ValueError, match=r"init_ckpt=.*simclr\.ckpt has no MAE decoder.*export.*init_weights"):
        built(init_ckpt=str(tmp_path / "simclr.ckpt"))
    with pytest.raises(FileNotFoundError, match=r"MAE: init_ckpt: checkpoint not found: .*missing\.ckpt"):
        built(init_ckpt=str(tmp_path / "missing.ckpt"))
    with pytest.raises(FileNotFoundError, match=r"MAE: init_weights: file not found: .*missing\.pth"):
        built(init_weights=str(tmp_path / "missing.pth"))


def test_a_resumed_fit_keeps_its_trained_weights_and_a_loaded_checkpoint_reads_no_initial_file(checkpoints, tmp_path):
    initial = tmp_path / "initial.ckpt"
    shutil.copy(checkpoints["initial_ckpt"], initial)
    settings = {**TINY, "init_ckpt": str(initial), "lr": 1e-2, "warmup_epochs": 0.0}
    model = MAE(**settings)
    trainer = quick_trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(model, loader())
    trained = {key: value.clone() for key, value in model.state_dict().items()}
    assert not torch.equal(trained["backbone.blocks.0.attn.qkv.weight"],
                           checkpoints["initial"].backbone.blocks[0].attn.qkv.weight)
    saved = tmp_path / "run.ckpt"
    trainer.save_checkpoint(saved)

    resumed = MAE(**settings)  # built (initial weights read) before Lightning restores the checkpoint over them
    quick_trainer(max_steps=2, limit_val_batches=0).fit(resumed, loader(), ckpt_path=saved)
    for key, value in resumed.state_dict().items():
        assert torch.equal(value, trained[key]), key

    initial.unlink()
    restored = MAE.load_from_checkpoint(saved, weights_only=True)
    for key, value in restored.state_dict().items():
        assert torch.equal(value, trained[key]), key


# ---------------------------------------------------------------- the self-distilled student


def student(checkpoints, teacher="further_ckpt", seed=4, **kwargs):
    model = SelfDistilledMAE(**{**TINY, "init_ckpt": checkpoints["initial_ckpt"],
                                "teacher_ckpt": checkpoints[teacher], **kwargs})
    torch.manual_seed(seed)
    model.load_teacher()
    model.configure_model()
    return model


def test_the_student_starts_from_the_initial_weights_and_the_frozen_teacher_stays_bit_identical(checkpoints, tmp_path):
    model = student(checkpoints, lr=1e-2)
    assert_same_weights(model.backbone, checkpoints["initial"].backbone)
    assert_same_weights(model.decoder, checkpoints["initial"].decoder)
    assert_same_weights(model.teacher.model, checkpoints["further"].backbone)
    trainer = quick_trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(model, loader())
    assert_same_weights(model.teacher.model, checkpoints["further"].backbone)
    assert not model.teacher.model.training and not any(p.requires_grad for p in model.teacher.parameters())
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized.isdisjoint(id(p) for p in model.teacher.parameters())
    assert not torch.equal(model.backbone.blocks[0].attn.qkv.weight, checkpoints["initial"].backbone.blocks[0].attn.qkv.weight)
    assert {"train/loss"} <= set(trainer.callback_metrics)

    saved = tmp_path / "student.ckpt"
    trainer.save_checkpoint(saved)
    state = torch.load(saved, weights_only=True)["state_dict"]
    assert [key for key in state if key.startswith("teacher.")] == ["teacher._extra_state"]  # a fingerprint only
    other_teacher = SelfDistilledMAE(**{**TINY, "init_ckpt": checkpoints["initial_ckpt"],
                                        "teacher_ckpt": checkpoints["initial_ckpt"]})
    with pytest.raises(ValueError, match="is not the teacher this checkpoint was trained with"):
        quick_trainer(max_steps=3, limit_val_batches=0).fit(other_teacher, loader(), ckpt_path=saved)


def test_the_distillation_term_is_zero_for_the_same_weights_and_else_the_reference_with_its_gradient(checkpoints):
    batch = next(iter(loader()))
    same = student(checkpoints, teacher="initial_ckpt")
    out = same.shared_step(batch)
    params = [p for p in same.backbone.parameters() if p.requires_grad]
    assert out["loss/distill"].item() == 0.0
    assert not any(grad.any() for grad in torch.autograd.grad(out["loss/distill"], params, allow_unused=True)
                   if grad is not None)

    model = student(checkpoints, distill_weight=0.5).double()
    images = batch["views"][0].double()
    out = model.shared_step({**batch, "views": [images]})
    assert out["loss/distill"].item() > 0
    torch.testing.assert_close(out["loss"], out["loss/mae"] + 0.5 * out["loss/distill"])
    params = [p for p in model.backbone.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out["loss/distill"], params, allow_unused=True)

    student_h = model.backbone(images)  # the paper's formula on the unmasked images, image by image
    teacher_h = model.teacher.model(images).detach()
    reference = sum(((student_h[i] - teacher_h[i]) ** 2).sum() for i in range(len(images))) / len(images)
    torch.testing.assert_close(out["loss/distill"], reference, rtol=1e-12, atol=1e-12)
    expected = torch.autograd.grad(reference, params, allow_unused=True)
    for grad, want in zip(grads, expected):
        torch.testing.assert_close(grad, want, rtol=1e-9, atol=1e-12)
    assert out["feats"].shape == (8, 32) and not out["feats"].requires_grad
    torch.testing.assert_close(out["feats"], student_h.detach())  # the probe reads the student representation


def test_a_teacher_of_another_architecture_is_refused_naming_the_keys(checkpoints, tmp_path):
    shallow = method_checkpoint(built(backbone_kwargs={**VIT_KWARGS, "depth": 1}), tmp_path / "shallow.ckpt")
    model = SelfDistilledMAE(**{**TINY, "teacher_ckpt": shallow})
    with pytest.raises(ValueError, match=r"SelfDistilledMAE: the teacher weights in teacher_ckpt=.*shallow\.ckpt.*"
                                         r"do not fit this SelfDistilledMAE's backbone.*missing \(\d+\): blocks\.1\."):
        model.load_teacher()


def test_a_fit_without_a_teacher_stops_naming_teacher_ckpt():
    model = SelfDistilledMAE(**TINY)
    with pytest.raises(ValueError, match=r"SelfDistilledMAE needs a teacher.*teacher_ckpt.*mae_further_pretrain\.yaml"):
        quick_trainer(max_steps=1).fit(model, loader())
    with pytest.raises(RuntimeError, match=r"teacher \(teacher_ckpt=None\) is not loaded.*load_teacher"):
        built(SelfDistilledMAE).shared_step(next(iter(loader())))
    with pytest.raises(ValueError, match="distill_weight must be >= 0"):
        SelfDistilledMAE(distill_weight=-1.0)
