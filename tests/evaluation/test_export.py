import json

import pytest
import timm
import torch
import torchvision
from safetensors.torch import load_file
from torch import nn

from ssl_lightning import load_backbone
from ssl_lightning.backbones import build_backbone
from ssl_lightning.cli import main
from ssl_lightning.datamodules import Digits
from ssl_lightning.methods import SimCLR

from helpers.fakes import SMALL_HEADS, TINY_BACKBONE, quick_trainer


def fit_checkpoint(tmp_path, **method_kwargs):
    model = SimCLR(**SMALL_HEADS, optimizer="adamw", lr=1e-3, **method_kwargs)
    trainer = quick_trainer(max_steps=1, limit_val_batches=0)
    trainer.fit(model, Digits(batch_size=32, num_workers=0))
    path = tmp_path / "method.ckpt"
    trainer.save_checkpoint(path)
    return model.eval(), path


def test_load_backbone_matches_the_method_backbone(tmp_path):
    model, path = fit_checkpoint(tmp_path, **TINY_BACKBONE, channels_last=True)
    backbone = load_backbone(path)
    x = torch.randn(3, 1, 32, 32)
    torch.testing.assert_close(backbone(x), model.backbone(x))


def test_export_writes_safetensors_and_builder_json(tmp_path, capsys):
    model, path = fit_checkpoint(tmp_path, **TINY_BACKBONE)
    out = tmp_path / "export" / "backbone.safetensors"
    main(["export", "--ckpt", str(path), "--out", str(out)])
    assert "wrote" in capsys.readouterr().out
    info = json.loads(out.with_suffix(".json").read_text())
    kwargs = TINY_BACKBONE["backbone_kwargs"]
    assert info["builder"] == {"name": "resnet18", "cifar_stem": True, "in_chans": 1, "kwargs": kwargs}
    digits = Digits()
    assert info["feature_dim"] == 64 and info["image_size"] == 32 and info["unknown"] == []
    assert info["mean"] == pytest.approx(list(digits.mean)) and info["std"] == pytest.approx(list(digits.std))
    rebuilt = build_backbone(**info["builder"]).eval()
    rebuilt.load_state_dict(load_file(out), strict=True)
    x = torch.randn(3, 1, 32, 32)
    torch.testing.assert_close(rebuilt(x), model.backbone(x))


@pytest.mark.parametrize("name", ["resnet18", "torchvision.resnet18"])
def test_export_of_unmodified_stem_loads_into_the_library_model(tmp_path, name):
    model = SimCLR(backbone=name, in_chans=3, num_classes=None, batch_size=8, image_size=32, **SMALL_HEADS)
    model.configure_model()
    trainer = quick_trainer(max_steps=0)
    trainer.strategy.connect(model)
    path = tmp_path / "method.ckpt"
    trainer.save_checkpoint(path)
    out = tmp_path / "backbone.safetensors"
    main(["export", "--ckpt", str(path), "--out", str(out)])
    if name.startswith("torchvision."):
        library_model = torchvision.models.resnet18()
        library_model.fc = nn.Identity()
    else:
        library_model = timm.create_model(name, num_classes=0)
    library_model.load_state_dict(load_file(out), strict=True)
    x = torch.randn(2, 3, 32, 32)
    model.eval(), library_model.eval()
    torch.testing.assert_close(library_model(x), model.backbone(x))
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["unknown"] == ["mean", "std"] and info["mean"] is None


def test_custom_backbone_checkpoint_is_refused_with_the_way_out(tmp_path):
    backbone = nn.Sequential(nn.Conv2d(1, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = SimCLR(backbone=backbone, in_chans=1, num_classes=None, batch_size=8, **SMALL_HEADS)
    model.configure_model()
    trainer = quick_trainer(max_steps=0)
    trainer.strategy.connect(model)
    path = tmp_path / "custom.ckpt"
    trainer.save_checkpoint(path)
    expected = r"given a backbone nn.Module from Python.*'state_dict' entries that start with 'backbone.'"
    with pytest.raises(ValueError, match=expected):
        load_backbone(path)
