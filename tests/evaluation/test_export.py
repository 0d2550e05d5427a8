import json
import re
from pathlib import Path

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
from ssl_lightning.evaluation import LinearProbe
from ssl_lightning.export import export_backbone
from ssl_lightning.methods import SimCLR

from helpers.fakes import SMALL_HEADS, TINY_BACKBONE, quick_trainer
from helpers.monitoring_stubs import FixedEmbeddings, StubMethod


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


def save_unfitted(model, path):
    """A Lightning checkpoint of ``model`` as built, without training it."""
    model.configure_model()
    trainer = quick_trainer(max_steps=0)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(path)
    return path


def test_custom_backbone_checkpoint_is_refused_with_the_way_out(tmp_path):
    backbone = nn.Sequential(nn.Conv2d(1, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = SimCLR(backbone=backbone, in_chans=1, num_classes=None, batch_size=8, **SMALL_HEADS)
    path = save_unfitted(model, tmp_path / "custom.ckpt")
    expected = r"given a backbone nn.Module from Python.*'state_dict' entries that start with 'backbone.'"
    with pytest.raises(ValueError, match=expected):
        load_backbone(path)


def evaluation_checkpoint(path):
    method = save_unfitted(SimCLR(**TINY_BACKBONE, in_chans=1, **SMALL_HEADS), path.with_name("method.ckpt"))
    return save_unfitted(LinearProbe(pretrained=str(method), num_classes=3, in_chans=1), path)


#: files that are not method checkpoints, and what the error must say each is
NOT_METHOD_CHECKPOINTS = {
    "missing": (lambda path: None, r"checkpoint not found"),
    "random bytes": (
        lambda path: path.write_bytes(b"\x00\x17 not a checkpoint " * 40),
        r"cannot be read as a checkpoint: torch.load\(weights_only=True\) fails",
    ),
    "python objects": (
        lambda path: torch.save({"state_dict": {}, "where": Path("x")}, path), r"Python objects \(pathlib\.PosixPath\)"
    ),
    "plain dict": (lambda path: torch.save({"weight": torch.ones(2)}, path), r"no 'state_dict'.*keys: weight"),
    "tensor": (lambda path: torch.save(torch.ones(3), path), r"holds a Tensor, not a checkpoint"),
    "no backbone": (
        lambda path: save_unfitted(StubMethod(FixedEmbeddings(4)), path), r"no 'backbone\.' entries.*layer\.weight"
    ),
    "evaluation": (evaluation_checkpoint, r"checkpoint of an evaluation of .*method\.ckpt, not of a method"),
}


@pytest.mark.parametrize("kind", NOT_METHOD_CHECKPOINTS)
@pytest.mark.parametrize("use", ["load_backbone", "export", "pretrained"])
def test_a_file_that_is_not_a_method_checkpoint_is_named_and_said_what_it_is(tmp_path, kind, use):
    write, expected = NOT_METHOD_CHECKPOINTS[kind]
    path = tmp_path / "given.ckpt"
    write(path)
    load = {
        "load_backbone": load_backbone,
        "export": lambda path: export_backbone(path, tmp_path / "out.safetensors"),
        "pretrained": lambda path: LinearProbe(pretrained=str(path), num_classes=3).configure_model(),
    }[use]
    with pytest.raises((ValueError, FileNotFoundError)) as error:
        load(path)
    message = str(error.value)
    assert str(path) in message and re.search(expected, message), message
    assert "weights_only=False" not in message and "nn.Module from Python" not in message
    # torch's own error, with its advice to load unsafely, is not chained into the traceback either
    assert error.value.__context__ is None or error.value.__suppress_context__


def test_export_command_refuses_a_saved_tensor_naming_it(tmp_path, capsys):
    path = tmp_path / "tensor.pt"
    torch.save(torch.ones(3), path)
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--ckpt", str(path), "--out", str(tmp_path / "out.safetensors")])
    assert exit_info.value.code == 2
    assert f"{path} holds a Tensor, not a checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out.safetensors").exists()
