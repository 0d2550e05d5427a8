"""Tiny deterministic data and model settings shared by the method tests."""

from __future__ import annotations

import inspect
import json

import torch
from torch.utils.data import DataLoader, Dataset

TINY_BACKBONE = {
    "backbone": "resnet18",
    "backbone_kwargs": {"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64]},
    "cifar_stem": True,
}

#: a two-block ViT on 16x16 images (patch 4: 16 tokens), for FSDP's transformer-block wrapping
TINY_VIT = {"backbone": "vit_tiny_patch16_224", "backbone_kwargs": {"img_size": 16, "patch_size": 4, "depth": 2}}


#: narrow heads and small memories for tests; each method takes the arguments its constructor has:
#: a queue of 64 rows (divisible by the tests' global batches, 8 to 32, and smaller than Digits'
#: 1,437 images), MoCHi mixing few of its hardest negatives, per-image memories sized for Digits
#: (the fake loaders' indices are below it), few SwAV prototypes, narrow MYOW mining heads
SMALL_HEADS = {"proj_hidden_dim": 32, "proj_dim": 16}
SMALL_HEAD_WIDTHS = {
    **SMALL_HEADS, "pred_hidden_dim": 32, "queue_size": 64, "num_hardest": 16, "num_mixed": 16, "num_query_mixed": 4,
    "num_train_images": 1437, "num_prototypes": 32, "mined_proj_hidden_dim": 32, "mined_proj_dim": 8, "out_dim": 64,
    "decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2,
}

#: methods that need a ViT: the tiny one, taking the images' size as they come (Digits' 8x8, fakes' 16x16)
VIT_ONLY = {"MAE", "IBOT", "SelfDistilledMAE"}
#: students whose Python ``teacher`` is an encoder of their own backbone's architecture, not a classifier
ENCODER_TEACHERS = {"SelfDistilledMAE"}
TINY_DYNAMIC_VIT = {**TINY_VIT, "backbone_kwargs": {**TINY_VIT["backbone_kwargs"], "dynamic_img_size": True}}


def tiny_method(method, backbone: dict | None = None, **kwargs):
    """A registered method (by name, ``METHODS`` key, or class) with the tiny backbone and narrow heads."""
    from ssl_lightning.methods import (
        METHODS,  # here, not at import: see conftest's note on Lightning
    )

    cls = METHODS[method] if isinstance(method, str) else method
    accepted = inspect.signature(cls.__init__).parameters
    default_backbone = TINY_DYNAMIC_VIT if cls.__name__ in VIT_ONLY else TINY_BACKBONE
    from ssl_lightning.cli import init_argument_names

    # distillation students (their teacher arguments may come from a base class)
    if "teacher" in init_argument_names(cls) and not any(key.startswith("teacher") for key in kwargs):
        in_chans = kwargs.get("in_chans") or 1
        kwargs["teacher"] = (tiny_encoder_teacher(in_chans, backbone or default_backbone)
                             if cls.__name__ in ENCODER_TEACHERS else tiny_teacher(in_chans, kwargs.get("num_classes") or 10))
    heads = {name: width for name, width in SMALL_HEAD_WIDTHS.items() if name in accepted}
    return cls(**(backbone or default_backbone), **{**heads, **kwargs})


def tiny_teacher(in_chans: int = 1, num_classes: int = 10):
    """A frozen-teacher stand-in for the distillation students: the tiny ResNet with a classifier, seeded
    (1 channel and 10 classes: Digits, what ``tiny_method`` is used with when no sizes are given)."""
    import timm

    with torch.random.fork_rng():
        torch.manual_seed(0)
        return timm.create_model("resnet18", in_chans=in_chans, num_classes=num_classes, **TINY_BACKBONE["backbone_kwargs"])


def tiny_encoder_teacher(in_chans: int = 1, backbone: dict = TINY_DYNAMIC_VIT):
    """A frozen-teacher stand-in for the students of ``ENCODER_TEACHERS``: the student's tiny backbone
    (images -> features, no classifier), seeded."""
    from ssl_lightning.backbones import build_backbone

    with torch.random.fork_rng():
        torch.manual_seed(0)
        return build_backbone(backbone["backbone"], in_chans=in_chans, kwargs=backbone.get("backbone_kwargs"))


def quick_trainer(**kwargs):
    """A CPU Trainer without logger, checkpoints, progress bar or model summary; ``kwargs`` win."""
    import lightning as L  # here, not at import: see conftest's note on Lightning and caplog

    defaults = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False)
    return L.Trainer(**{**defaults, **kwargs})


class FakeViews(Dataset):
    """Random two-view samples in the batch-dict format, the same for every epoch."""

    def __init__(self, length: int = 32, num_views: int = 2, in_chans: int = 1, size: int = 16, num_classes: int = 4):
        self.length, self.num_views, self.in_chans, self.size, self.num_classes = (
            length, num_views, in_chans, size, num_classes,
        )

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.length:
            raise IndexError(i)  # also ends plain iteration over the dataset
        g = torch.Generator().manual_seed(i)
        views = [torch.randn(self.in_chans, self.size, self.size, generator=g) for _ in range(self.num_views)]
        return {"views": views, "label": i % self.num_classes, "index": i}


def fake_loader(batch_size: int = 8, **kwargs) -> DataLoader:
    return DataLoader(FakeViews(**kwargs), batch_size=batch_size)


def tiny_fit_args(run_name: str, max_epochs: int, *extra: str) -> list[str]:
    """CLI arguments of a 3-step-per-epoch tiny SimCLR fit on Digits, a step checkpoint each step."""
    return [
        "fit", "--model", "SimCLR", "--data", "Digits", "--data.batch_size", "32", "--data.num_workers", "0",
        "--model.init_args.backbone_kwargs", json.dumps(TINY_BACKBONE["backbone_kwargs"]),
        "--model.init_args.cifar_stem", "true", "--model.init_args.proj_hidden_dim", "32",
        "--model.init_args.proj_dim", "16", "--model.init_args.optimizer", "adamw", "--model.init_args.lr", "1e-3",
        "--trainer.accelerator", "cpu", "--trainer.max_epochs", str(max_epochs),
        "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "0",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--run_name", run_name, "--checkpoint_every_n_steps", "1", *extra,
    ]
