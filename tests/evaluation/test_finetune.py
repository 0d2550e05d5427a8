import json

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from timm.layers import DropPath
from torch import nn

from ssl_lightning.backbones import build_backbone
from ssl_lightning.cli import main
from ssl_lightning.datamodules import Digits
from ssl_lightning.evaluation import FineTune
from ssl_lightning.optim import layer_decay_param_groups

from helpers.fakes import TINY_BACKBONE, quick_trainer
from helpers.paths import CONFIGS

RECIPE = ["--config", str(CONFIGS / "quickstart.yaml"), "--data.batch_size", "32"]


def test_finetune_cli_trains_the_whole_network_and_writes_the_last_epoch_result(method_checkpoint, tmp_path):
    finetune = ["--config", str(CONFIGS / "eval" / "finetune.yaml"), "--model.pretrained", str(method_checkpoint)]
    cli = main(["fit", *RECIPE, *finetune, "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "2",
                "--trainer.limit_val_batches", "2", "--trainer.default_root_dir", str(tmp_path),
                "--trainer.enable_progress_bar", "false", "--trainer.enable_checkpointing", "false",
                "--trainer.log_every_n_steps", "1"])
    model, pretrained = cli.model, torch.load(method_checkpoint, weights_only=True)["state_dict"]
    assert model.hparams.num_classes == 10 and model.head.out_features == 10 and model.backbone.training
    for name, param in model.backbone.named_parameters():
        assert not torch.equal(param, pretrained[f"backbone.{name}"]), name  # unlike LinearProbe
    assert not torch.equal(model.backbone.bn1.running_mean, pretrained["backbone.bn1.running_mean"])
    assert {"train/finetune_loss", "val/finetune_top1", "val/finetune_top5", "lr/weights", "lr/no_decay"} <= set(
        cli.trainer.callback_metrics
    )

    record = json.loads((tmp_path / "finetune_top1.json").read_text())
    assert record["dataset"] == "Digits" and record["split"] == "val" and record["epochs"] == 2
    assert record["metric"] == "finetune_top1" and record["checkpoint"] == str(method_checkpoint)
    assert record["value"] == round(100 * float(cli.trainer.callback_metrics["val/finetune_top1"]), 4)
    for part in ("'supervised' view", "adamw lr 0.0005 per 256 (linear scaling: peak 6.25e-05)", "wd 0.05",
                 "no layer decay", "label smoothing 0.1", "5 warm-up epochs"):
        assert part in record["protocol"]
    lines = (tmp_path / "results.md").read_text().splitlines()
    assert lines[0].startswith("| dataset |") and len(lines) == 3 and "finetune_top1" in lines[2]


def tiny_finetune(method_checkpoint, **kwargs) -> FineTune:
    model = FineTune(pretrained=str(method_checkpoint), in_chans=1, num_classes=10, **kwargs)
    model.configure_model()
    return model.eval()  # fixed BatchNorm statistics: the same image gives the same logits in any batch


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # a bare training_step, no Trainer
def test_unlabelled_images_are_left_out_of_the_loss(method_checkpoint):
    model = tiny_finetune(method_checkpoint, label_smoothing=0.1)
    images, labels = torch.randn(6, 1, 32, 32), torch.tensor([3, -1, 7, -1, -1, 0])
    loss = model.training_step({"views": [images], "label": labels, "index": torch.arange(6)}, 0)
    kept = labels >= 0
    expected = F.cross_entropy(model(images[kept]), labels[kept], label_smoothing=0.1)
    torch.testing.assert_close(loss, expected)
    other = images.clone()
    other[~kept] = 100.0  # what the unlabelled images are does not matter
    torch.testing.assert_close(model.training_step({"views": [other], "label": labels, "index": torch.arange(6)}, 0),
                               expected)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # a bare training_step, no Trainer
def test_a_batch_without_labels_gives_a_zero_loss_that_reaches_every_parameter(method_checkpoint):
    model = tiny_finetune(method_checkpoint)
    loss = model.training_step({"views": [torch.randn(4, 1, 32, 32)], "label": torch.full((4,), -1),
                                "index": torch.arange(4)}, 0)
    loss.backward()
    assert loss.item() == 0.0
    assert all(param.grad is not None and not param.grad.any() for param in model.parameters())


# ---------------------------------------------------------------- layer-wise learning-rate decay


def scales_and_decay(backbone: nn.Module, head: nn.Module, layer_decay: float) -> dict[str, tuple[float, float]]:
    """Parameter name (head ones prefixed "head.") -> (lr_scale, weight_decay) of its group."""
    groups = layer_decay_param_groups(backbone, head, weight_decay=0.05, layer_decay=layer_decay)
    names = {id(p): n for n, p in backbone.named_parameters()}
    names |= {id(p): f"head.{n}" for n, p in head.named_parameters()}
    found = {names[id(p)]: (group["lr_scale"], group["weight_decay"]) for group in groups for p in group["params"]}
    assert len(found) == sum(1 for _ in backbone.parameters()) + 2  # every parameter exactly once
    return found


def test_vit_layers_are_embeddings_then_blocks_then_head():
    vit = build_backbone("vit_tiny_patch16_224", kwargs={"img_size": 32, "depth": 2})
    found = scales_and_decay(vit, nn.Linear(192, 10), layer_decay=0.5)
    # MAE/BEiT with L = depth + 1 = 3: embeddings 0.5^3, block i 0.5^(2 - i), head 1; the final norm
    # goes with the last block (timm's grouping).
    expected = {"cls_token": 0.125, "pos_embed": 0.125, "patch_embed.": 0.125, "blocks.0.": 0.25, "blocks.1.": 0.5,
                "norm.": 0.5, "head.": 1.0}
    for name, (scale, _) in found.items():
        (prefix,) = [p for p in expected if name.startswith(p)]
        assert scale == expected[prefix], name
    undecayed = {name for name, (_, decay) in found.items() if decay == 0.0}
    assert {"cls_token", "pos_embed", "patch_embed.proj.bias", "blocks.0.norm1.weight", "norm.bias",
            "head.bias"} <= undecayed
    assert {"patch_embed.proj.weight", "blocks.1.attn.qkv.weight", "head.weight"}.isdisjoint(undecayed)


@pytest.mark.parametrize("name", ["resnet18", "torchvision.resnet18"])
def test_resnet_layers_are_stem_then_stages_then_head(name):
    small = TINY_BACKBONE["backbone_kwargs"] if name == "resnet18" else {}  # torchvision's builder takes no sizes
    backbone = build_backbone(name, cifar_stem=True, kwargs=small)
    found = scales_and_decay(backbone, nn.Linear(backbone.num_features, 10), layer_decay=0.5)
    expected = {"conv1.": 1 / 32, "bn1.": 1 / 32, "layer1.": 1 / 16, "layer2.": 1 / 8, "layer3.": 1 / 4,
                "layer4.": 1 / 2, "head.": 1.0}
    shapes = {name: p.shape for name, p in backbone.named_parameters()} | {"head.weight": (10, 1), "head.bias": (10,)}
    for name, (scale, decay) in found.items():
        (prefix,) = [p for p in expected if name.startswith(p)]
        assert scale == expected[prefix], name
        assert decay == (0.05 if len(shapes[name]) > 1 else 0.0), name  # convolutions and the head's weight


def test_without_layer_decay_there_are_two_groups_at_full_lr():
    vit = build_backbone("vit_tiny_patch16_224", kwargs={"img_size": 32, "depth": 1})
    groups = layer_decay_param_groups(vit, nn.Linear(192, 10), weight_decay=0.05, layer_decay=None)
    assert [(g["name"], g["lr_scale"], g["weight_decay"]) for g in groups] == [
        ("weights", 1.0, 0.05), ("no_decay", 1.0, 0.0)
    ]
    assert any(param is vit.pos_embed for param in groups[1]["params"])


def test_layer_decay_needs_a_known_layer_structure():
    custom = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(ValueError, match="Sequential has no timm group_matcher.*set layer_decay to None"):
        layer_decay_param_groups(custom, nn.Linear(4, 2), weight_decay=0.05, layer_decay=0.75)


class RecordLRs(Callback):
    def __init__(self):
        self.lrs: list[dict[str, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append({group["name"]: group["lr"] for group in trainer.optimizers[0].param_groups})


def test_each_group_lr_is_base_lr_times_scale_times_schedule(method_checkpoint):
    model = FineTune(pretrained=str(method_checkpoint), lr=1e-3, lr_scaling="none", layer_decay=0.5, warmup_epochs=1.5)
    record = RecordLRs()
    # 2 epochs x 2 batches = 4 steps, warm-up ceil(1.5 x 2) = 3 steps: factor (step + 1) / 3
    trainer = quick_trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=0, callbacks=[record])
    trainer.fit(model, Digits(batch_size=32, num_workers=0, views="supervised"))
    scales = {"layer0": 1 / 32, "layer1": 1 / 16, "layer2": 1 / 8, "layer3": 1 / 4, "layer4": 1 / 2, "layer5": 1.0}
    for step, factor in ((0, 1 / 3), (1, 2 / 3), (2, 1.0)):
        lrs = record.lrs[step]
        assert set(lrs) == set(scales) | {f"{name}_no_decay" for name in scales}
        for name, lr in lrs.items():
            assert lr == pytest.approx(1e-3 * scales[name.removesuffix("_no_decay")] * factor), (step, name)


# ---------------------------------------------------------------- building and errors


def test_drop_path_rebuilds_the_backbone_with_stochastic_depth(method_checkpoint):
    model = tiny_finetune(method_checkpoint, drop_path_rate=0.1)
    assert any(isinstance(module, DropPath) for module in model.backbone.modules())
    assert not any(isinstance(module, DropPath) for module in tiny_finetune(method_checkpoint).backbone.modules())


def test_a_multi_view_recipe_is_refused_before_training(method_checkpoint):
    model = FineTune(pretrained=str(method_checkpoint))
    with pytest.raises(ValueError, match="one view per image, but the DataModule's view recipe makes 2.*supervised"):
        quick_trainer(fast_dev_run=1).fit(model, Digits(batch_size=32, num_workers=0, views="simclr"))


def test_clear_errors(method_checkpoint):
    with pytest.raises(ValueError, match="needs num_classes"):
        FineTune(pretrained=str(method_checkpoint), in_chans=1).configure_model()
    with pytest.raises(ValueError, match="takes 1-channel images but the DataModule yields 3-channel"):
        FineTune(pretrained=str(method_checkpoint), in_chans=3, num_classes=10).configure_model()
    with pytest.raises(ValueError, match=r"layer_decay must be in \(0, 1\] or None"):
        FineTune(pretrained=str(method_checkpoint), layer_decay=1.5)
