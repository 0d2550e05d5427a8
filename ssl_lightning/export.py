"""The trained backbone out of a method checkpoint: as an ``nn.Module`` or as a safetensors file.

``backbone.safetensors`` holds the backbone's state dict alone; ``backbone.json`` beside it holds
what is needed to rebuild and feed it (the builder arguments of :func:`build_backbone`, the
feature dimension, and the input size, mean and std it was trained with).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ssl_lightning.backbones import build_backbone, feature_dim

PREFIX = "backbone."
WANTED = "pass a method checkpoint written by `fit` (e.g. <run>/checkpoints/last.ckpt)"


def load_checkpoint(ckpt_path: str | Path) -> dict:
    """A method checkpoint written by ``fit``, read with ``weights_only=True``.

    Export, ``load_backbone`` and the evaluations all read checkpoints here, so any other file is an
    error that names it and says what it is: missing, not a checkpoint torch can read safely, a
    checkpoint without ``state_dict``, an evaluation's checkpoint, or one without a backbone.
    """
    path = Path(ckpt_path)
    if not path.is_file():
        kind = " (a directory, not a file)" if path.is_dir() else ""
        raise FileNotFoundError(f"checkpoint not found: {path}{kind}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for foreign or truncated files
        # `from None`: torch's own message advises weights_only=False, unsafe for a file of unknown origin.
        raise ValueError(f"{path} cannot be read as a checkpoint: {_why_unreadable(path, error)}; {WANTED}") from None
    _check_method_checkpoint(checkpoint, path)
    return checkpoint


def _why_unreadable(path: Path, error: Exception) -> str:
    """torch.load's failure in a few words, without its advice to load unsafely."""
    text = str(error)
    if path.stat().st_size == 0:
        return "the file is empty"
    if found := re.search(r"Unsupported global: GLOBAL ([\w.]+)", text):
        return (f"it holds Python objects ({found[1]}), which a safe load (weights_only=True) refuses and "
                "checkpoints from `fit` never hold")
    if found := re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text):
        return f"torch.load(weights_only=True) fails ({found[1]})"
    lines = text.strip().splitlines()
    first_sentence = lines[0].split(". ")[0] if lines else "no message"
    return f"torch.load(weights_only=True) fails ({type(error).__name__}: {first_sentence})"


def _check_method_checkpoint(checkpoint: Any, path: Path) -> None:
    """Refuse what torch loaded unless it is a method's Lightning checkpoint with a backbone."""
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint; {WANTED}")
    if "state_dict" not in checkpoint:
        keys = ", ".join(sorted(map(str, checkpoint))[:8])
        raise ValueError(
            f"{path} has no 'state_dict' (keys: {keys}), so it is not a Lightning checkpoint (a bare state dict "
            f"loads with load_state_dict into the module it came from); {WANTED}"
        )
    hparams = checkpoint.get("hyper_parameters") or {}
    if "pretrained" in hparams:  # evaluations (LinearProbe, KNNEvaluation, FineTune) start from a method's
        raise ValueError(
            f"{path} is the checkpoint of an evaluation of {hparams['pretrained']}, not of a method: pass the "
            "method checkpoint the evaluation started from"
        )
    if not any(key.startswith(PREFIX) for key in checkpoint["state_dict"]):
        keys = ", ".join(list(checkpoint["state_dict"])[:5])
        raise ValueError(
            f"{path} is a Lightning checkpoint without a backbone: its state_dict has no '{PREFIX}' entries "
            f"(it has {keys or 'none'}); {WANTED}"
        )


def builder_args(checkpoint: dict, ckpt_path: str | Path = "<checkpoint>") -> dict[str, Any]:
    """The keyword arguments of :func:`build_backbone` that rebuild the checkpoint's backbone (one that
    :func:`load_checkpoint` accepted: a method's, with ``backbone.`` entries)."""
    hparams = checkpoint.get("hyper_parameters") or {}
    if "backbone" not in hparams:
        raise ValueError(
            f"{ckpt_path}: the method was given a backbone nn.Module from Python, so the checkpoint does not "
            "say how to build it. Build that module yourself and load the checkpoint's 'state_dict' entries "
            f"that start with '{PREFIX}' (prefix removed) with torch.load(path, weights_only=True)."
        )
    facts = checkpoint.get("data_facts") or {}
    return {
        "name": hparams["backbone"],
        "cifar_stem": bool(hparams.get("cifar_stem", False)),
        "in_chans": hparams.get("in_chans") or facts.get("in_chans") or 3,
        "kwargs": dict(hparams.get("backbone_kwargs") or {}),
    }


def backbone_state_dict(checkpoint: dict) -> dict[str, torch.Tensor]:
    return {key[len(PREFIX):]: value for key, value in checkpoint["state_dict"].items() if key.startswith(PREFIX)}


def load_backbone(ckpt_path: str | Path) -> nn.Module:
    """The bare backbone of a method checkpoint, with its trained weights (in eval mode)."""
    return rebuild_backbone(load_checkpoint(ckpt_path), ckpt_path)[0]


def rebuild_backbone(
    checkpoint: dict, ckpt_path: str | Path, extra_kwargs: dict[str, Any] | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """The checkpoint's backbone (eval mode, weights loaded strictly) and its builder arguments.

    ``extra_kwargs`` join the builder's ``kwargs``; they must not add parameters (fine-tuning's
    ``drop_path_rate`` does not)."""
    builder = builder_args(checkpoint, ckpt_path)
    builder["kwargs"].update(extra_kwargs or {})
    backbone = build_backbone(**builder)
    backbone.load_state_dict(backbone_state_dict(checkpoint), strict=True)
    return backbone.eval(), builder


def input_facts(checkpoint: dict) -> dict[str, Any]:
    """Input size, mean and std the backbone was trained with; None where the checkpoint does not say
    (checkpoints written without a DataModule)."""
    hparams = checkpoint.get("hyper_parameters") or {}
    facts = {**(checkpoint.get("datamodule_hyper_parameters") or {}), **(checkpoint.get("data_facts") or {})}
    image_size = hparams.get("image_size") or facts.get("image_size")
    return {
        "image_size": image_size,
        "mean": list(facts["mean"]) if facts.get("mean") is not None else None,
        "std": list(facts["std"]) if facts.get("std") is not None else None,
    }


def export_backbone(ckpt_path: str | Path, out: str | Path) -> dict[str, Any]:
    """Write ``out`` (safetensors state dict) and ``out`` with suffix ``.json`` (how to rebuild and feed
    it); return the JSON description."""
    from safetensors.torch import save_file

    checkpoint = load_checkpoint(ckpt_path)
    backbone, builder = rebuild_backbone(checkpoint, ckpt_path)
    inputs = input_facts(checkpoint)
    description = {
        "builder": builder,
        "feature_dim": feature_dim(backbone, builder["in_chans"], inputs["image_size"] or 32),
        **inputs,
        "unknown": [key for key, value in inputs.items() if value is None],
        "checkpoint": str(ckpt_path),
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # safetensors needs contiguous tensors; channels_last training stores NHWC-strided weights.
    save_file({key: value.contiguous() for key, value in backbone.state_dict().items()}, str(out))
    out.with_suffix(".json").write_text(json.dumps(description, indent=2) + "\n")
    return description


def export_command(argv: list[str]) -> None:
    """``python -m ssl_lightning export --ckpt <path> --out backbone.safetensors``."""
    parser = argparse.ArgumentParser(
        prog="python -m ssl_lightning export",
        description="Write a method checkpoint's backbone as safetensors, with a JSON file of its builder "
        "arguments, feature dimension, input size, mean and std beside it.",
    )
    parser.add_argument("--ckpt", required=True, help="method checkpoint (.ckpt)")
    parser.add_argument("--out", default="backbone.safetensors", help="output file; the JSON goes beside it")
    args = parser.parse_args(argv)
    try:
        description = export_backbone(args.ckpt, args.out)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    unknown = description["unknown"]
    note = f"; unknown (null in the JSON): {', '.join(unknown)}" if unknown else ""
    sys.stdout.write(
        f"wrote {args.out} and {Path(args.out).with_suffix('.json')} "
        f"({description['builder']['name']}, {description['feature_dim']}-d features{note})\n"
    )
