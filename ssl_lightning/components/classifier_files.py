"""Trained classifiers (images -> logits) read from files: one of our checkpoints (a supervised
method's, or a ``FineTune`` checkpoint: backbone, kept projector blocks and head), an exported
backbone with its head, or timm weights. The frozen teacher of distillation and the source model of
test-time adaptation load through here; ``role`` ("teacher", "source") names their arguments
(``<role>_ckpt``, ``<role>_head``, ``<role>_timm``, ``<role>_weights``) in errors."""

from __future__ import annotations

import json
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import get_pretrained_cfg_value
from torch import Tensor, nn

from ssl_lightning.backbones import build_backbone, feature_dim
from ssl_lightning.components.heads import LinearClassifier
from ssl_lightning.export import PREFIX, backbone_state_dict, builder_args, input_facts, load_checkpoint

HEAD_PREFIX = "head."
PROJECTOR_PREFIX = "projector."
#: the entry of a FineTune checkpoint that makes it a classifier file: the backbone's builder arguments
#: and how many projector blocks sit between the backbone and the head (``evaluation.finetune``)
FINETUNED_CLASSIFIER = "finetuned_classifier"
#: how a user makes a classifier checkpoint, named in errors
TRAIN_A_CLASSIFIER = ("train one with `python -m ssl_lightning fit --config configs/cifar10/classifier.yaml --run_name "
                      "cifar10-classifier`, which writes runs/cifar10-classifier/checkpoints/last.ckpt")


@dataclass
class LoadedClassifier:
    """What a loader returns: the images -> logits module and what is known about its inputs."""

    model: nn.Module
    num_classes: int
    in_chans: int | None
    #: image_size, mean, std the classifier was trained with (None where unknown)
    inputs: dict[str, Any] = field(default_factory=dict)


@dataclass
class ClassifierSource:
    """Where a trained classifier comes from, as the user gave it: exactly one of ``ckpt`` (one of our
    checkpoints, or an exported backbone ``.safetensors`` with ``head``), ``timm_name`` with ``weights``
    (and ``timm_kwargs``), or a module given in Python (``module_name`` its class name). ``owner`` (the
    method) and ``role`` ("teacher", "source") word the errors."""

    owner: str
    role: str
    ckpt: str | None = None
    head: str | None = None
    timm_name: str | None = None
    weights: str | None = None
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    module_name: str | None = None

    def __post_init__(self) -> None:
        owner, role = self.owner, self.role
        given = [name for name, value in ((f"{role}_ckpt", self.ckpt), (f"{role}_timm", self.timm_name),
                                          (role, self.module_name)) if value is not None]
        if len(given) > 1:
            raise ValueError(f"{owner}: give one {role} source, got {' and '.join(given)}.")
        if self.weights is not None and self.timm_name is None:
            raise ValueError(
                f"{owner}: {role}_weights={self.weights!r} are the weights of a timm model: set {role}_timm to its "
                f"name. (For one of our checkpoints use {role}_ckpt alone.)"
            )
        if self.timm_name is not None and self.weights is None:
            raise ValueError(
                f"{owner}: {role}_timm={self.timm_name!r} needs {role}_weights, a local file with the trained "
                f"{role}'s state dict (.pth or .safetensors); a randomly initialised {role} classifies nothing."
            )
        if self.head is not None and not self.is_export:
            raise ValueError(
                f"{owner}: {role}_head={self.head!r} goes with an exported backbone ({role}_ckpt ending in "
                ".safetensors); a .ckpt holds its head already."
            )

    @property
    def is_export(self) -> bool:
        return self.ckpt is not None and Path(self.ckpt).suffix == ".safetensors"

    def describe(self) -> str:
        """The source, as the user wrote it."""
        role = self.role
        if self.module_name is not None:
            return f"the {role} module {self.module_name} given in Python"
        if self.timm_name is not None:
            return f"{role}_timm={self.timm_name!r} with {role}_weights={self.weights}"
        if self.is_export:
            return f"{role}_ckpt={self.ckpt} (exported backbone) with {role}_head={self.head}"
        return f"{role}_ckpt={self.ckpt}"

    def read(self, in_chans: int | None) -> LoadedClassifier:
        """Build the classifier from its file (``in_chans``: the data's, the default of a timm model)."""
        owner, role = self.owner, self.role
        if self.timm_name is not None:
            return from_timm(owner, self.timm_name, self.weights, self.timm_kwargs, in_chans, role)
        if self.ckpt is None:
            raise ValueError(
                f"{owner} needs a {role}, and none was given. Pass --model.init_args.{role}_ckpt <a Classifier "
                f"checkpoint> ({TRAIN_A_CLASSIFIER}), or {role}_timm with {role}_weights, or an exported backbone "
                f"({role}_ckpt <file>.safetensors) with {role}_head, or {role}=<nn.Module> in Python."
            )
        if self.is_export:
            return from_export(owner, self.ckpt, self.head, role)
        return from_checkpoint(owner, self.ckpt, role)

    def check_fits_data(self, loaded: LoadedClassifier, num_classes: int | None, in_chans: int | None,
                        datamodule: Any = None) -> None:
        """The classifier against the data: the class count and input channels must match (an error
        with both numbers); another normalisation than the DataModule's ``mean``/``std`` is warned
        about (the classifier would see images unlike its training images)."""
        owner, role = self.owner, self.role
        if num_classes is not None and loaded.num_classes is not None and loaded.num_classes != num_classes:
            raise ValueError(
                f"{owner}: the {role} ({self.describe()}) predicts {loaded.num_classes} classes, but the data has "
                f"{num_classes} (num_classes={num_classes}). Use a {role} trained on the same classes."
            )
        if in_chans is not None and loaded.in_chans is not None and loaded.in_chans != in_chans:
            raise ValueError(
                f"{owner}: the {role} ({self.describe()}) takes {loaded.in_chans}-channel images, but the data has "
                f"{in_chans} channels. Use a {role} trained on the same kind of images."
            )
        for key in ("mean", "std"):
            ours, theirs = getattr(datamodule, key, None), loaded.inputs.get(key)
            if ours is None or theirs is None:
                continue
            if len(ours) != len(theirs) or any(abs(a - b) > 1e-4 for a, b in zip(ours, theirs)):
                warnings.warn(
                    f"{owner}: the {role} ({self.describe()}) was trained on images normalised with {key} "
                    f"{list(theirs)}, but the DataModule {type(datamodule).__name__} uses {list(ours)}: the {role} "
                    f"sees images unlike its training images. Use the {role}'s data settings.",
                    stacklevel=3,
                )


def from_checkpoint(owner: str, path: str, role: str = "teacher") -> LoadedClassifier:
    try:
        checkpoint = load_checkpoint(path)  # weights_only=True; refuses files that are not a method's checkpoint
    except ValueError as error:
        # Evaluations' checkpoints are refused there; a FineTune checkpoint is a whole classifier.
        finetuned = _finetune_checkpoint(path)
        if finetuned is None:
            raise ValueError(f"{owner}: {role}_ckpt: {error}") from None
        return from_finetune_checkpoint(owner, path, finetuned, role)
    try:
        builder = builder_args(checkpoint, path)
    except ValueError as error:
        raise ValueError(f"{owner}: {role}_ckpt: {error}") from None
    state = checkpoint["state_dict"]
    head = {key[len(HEAD_PREFIX):]: value for key, value in state.items() if key.startswith(HEAD_PREFIX)}
    if "weight" not in head or head["weight"].dim() != 2:
        modules = sorted({key.split(".", 1)[0] for key in state})
        raise ValueError(
            f"{owner}: {role}_ckpt={path} is not a classifier checkpoint: it has no classifier head ('head.weight'; "
            f"its modules: {', '.join(modules)}). {owner} needs a classifier checkpoint, of Classifier or of a "
            f"distilled student: {TRAIN_A_CLASSIFIER}, or fine-tune this checkpoint's backbone first."
        )
    backbone = build_backbone(**builder)
    load_exactly(owner, role, backbone, backbone_state_dict(checkpoint), f"{builder['name']} (the backbone its "
                 f"hyperparameters describe)", f"{role}_ckpt={path} ('{PREFIX}' entries)")
    classifier = _linear_head(owner, role, head, f"{role}_ckpt={path} ('head.' entries)")
    return LoadedClassifier(_backbone_and_head(backbone, classifier), classifier.out_features, builder["in_chans"],
                            input_facts(checkpoint))


def _finetune_checkpoint(path: str) -> dict | None:
    """The file as a FineTune checkpoint (read with ``weights_only=True``), or None if it is not one."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # load_checkpoint has named what is wrong with the file already
        return None
    return checkpoint if isinstance(checkpoint, dict) and FINETUNED_CLASSIFIER in checkpoint else None


def from_finetune_checkpoint(owner: str, path: str, checkpoint: dict, role: str = "teacher") -> LoadedClassifier:
    """A ``FineTune`` checkpoint as images -> logits: its backbone (rebuilt from the builder arguments
    it records), the projector blocks it kept (SimCLRv2's fine-tuning from the projector's first
    layer) and its linear head, each loaded strictly, in this order."""
    record, state = checkpoint[FINETUNED_CLASSIFIER], checkpoint["state_dict"]
    builder = dict(record["builder"])
    source = f"{role}_ckpt={path} (a FineTune checkpoint)"
    backbone = build_backbone(**builder)
    load_exactly(owner, role, backbone, backbone_state_dict(checkpoint), f"{builder['name']} (the backbone it "
                 "records)", f"{source} ('{PREFIX}' entries)")
    projector = projector_blocks(owner, state, record["projector_layers"], source, blocks_only=True)
    head = {key[len(HEAD_PREFIX):]: value for key, value in state.items() if key.startswith(HEAD_PREFIX)}
    classifier = _linear_head(owner, role, head, f"{source} ('head.' entries)")
    model = nn.Sequential(OrderedDict(backbone=backbone.eval(), projector=projector.eval(), head=classifier))
    return LoadedClassifier(model, classifier.out_features, builder["in_chans"], input_facts(checkpoint))


def hidden_block_count(state: dict[str, Tensor], prefix: str = PROJECTOR_PREFIX, blocks_only: bool = False) -> int:
    """How many hidden Linear -> BatchNorm1d -> ReLU blocks the :class:`~ssl_lightning.components.heads.MLPHead`
    stored under ``prefix`` has, read from its state dict alone (block ``j``: ``{3j}`` the Linear,
    ``{3j+1}`` the BatchNorm with affine weights; in a whole MLPHead a Linear at ``{3j+3}`` follows a
    hidden block, else it is the output layer). ``blocks_only``: the entries hold hidden blocks alone
    (FineTune's kept blocks), no output layer. 0: no MLPHead there, or one linear layer."""
    count = 0
    while True:
        linear, norm, following = (f"{prefix}{3 * count + offset}." for offset in (0, 1, 3))
        weight, next_weight = state.get(linear + "weight"), state.get(following + "weight")
        if weight is None or weight.dim() != 2 or norm + "running_mean" not in state or norm + "weight" not in state:
            return count
        followed = next_weight is not None and next_weight.dim() == 2 and next_weight.shape[1] == weight.shape[0]
        if not (blocks_only or followed):
            return count
        count += 1


def projector_blocks(owner: str, state: dict[str, Tensor], count: int, source: str,
                     prefix: str = PROJECTOR_PREFIX, blocks_only: bool = False) -> nn.Sequential:
    """The first ``count`` hidden blocks of the MLPHead stored under ``prefix`` in ``state``, with its
    weights and BatchNorm statistics (loaded strictly; the keys keep their indices, ``0.weight``,
    ``1.running_mean``, ...). ``count`` 0 gives an empty Sequential (the identity). An error names the
    blocks there are when fewer than ``count``, or says the projector is missing."""
    if count == 0:
        return nn.Sequential()
    found = hidden_block_count(state, prefix, blocks_only)
    if found < count:
        if not any(key.startswith(prefix) for key in state):
            modules = sorted({key.split(".", 1)[0] for key in state})
            what = f"has no '{prefix}' module (its modules: {', '.join(modules)})"
        elif found == 0:
            what = (f"has a '{prefix.rstrip('.')}' that is not an MLPHead with hidden blocks (Linear-BN-ReLU at "
                    f"{prefix}0, {prefix}1, {prefix}2, then a Linear at {prefix}3)")
        else:
            what = f"has {found} hidden Linear-BN-ReLU block(s) in its projector (a {found + 1}-layer MLPHead)"
        raise ValueError(
            f"{owner}: {source} {what}, but {count} projector block(s) were asked for. Keep at most {found} "
            f"(projector_layers), or pretrain with a deeper projector (SimCLR proj_layers=3 for SimCLRv2)."
        )
    layers: list[nn.Module] = []
    for block in range(count):
        weight = state[f"{prefix}{3 * block}.weight"]
        layers += [nn.Linear(weight.shape[1], weight.shape[0], bias=f"{prefix}{3 * block}.bias" in state),
                   nn.BatchNorm1d(weight.shape[0]), nn.ReLU(inplace=True)]
    blocks = nn.Sequential(*layers)
    kept = {key: state[prefix + key] for key in blocks.state_dict() if prefix + key in state}
    load_exactly(owner, "projector", blocks, kept, f"{count} Linear-BN-ReLU block(s)",
                 f"{source} ('{prefix}' entries)")
    return blocks


def from_export(owner: str, path: str, head_path: str | None, role: str = "teacher") -> LoadedClassifier:
    from safetensors.torch import load_file

    backbone_file, description_file = Path(path), Path(path).with_suffix(".json")
    for file, what in ((backbone_file, "exported backbone"), (description_file, "export's description")):
        if not file.is_file():
            raise FileNotFoundError(f"{owner}: {role}_ckpt: the {what} {file} is missing (export writes both files).")
    if head_path is None:
        raise ValueError(
            f"{owner}: {role}_ckpt={path} is an exported backbone, and `export` writes the backbone only, without "
            f"the classifier head. Give {role}_head, a file with the head's 'weight' [C, D] and 'bias' [C], or use the "
            f"checkpoint the backbone was exported from as {role}_ckpt."
        )
    description = json.loads(description_file.read_text())
    builder = description["builder"]
    backbone = build_backbone(**builder)
    load_exactly(owner, role, backbone, load_file(str(backbone_file)),
                 f"{builder['name']} (as {description_file} says)", f"{role}_ckpt={path}")
    head_state = read_state_dict(owner, head_path, f"{role}_head")
    head = {key.removeprefix(HEAD_PREFIX): value for key, value in head_state.items()}
    classifier = _linear_head(owner, role, head, f"{role}_head={head_path}")
    features = (description.get("feature_dim")
                or feature_dim(backbone, builder["in_chans"], description.get("image_size") or 32))
    if classifier.in_features != features:
        raise ValueError(
            f"{owner}: {role}_head={head_path} takes {classifier.in_features}-d features, but the exported backbone "
            f"{path} gives {features}-d ones: give the head trained on this backbone."
        )
    inputs = {key: description.get(key) for key in ("image_size", "mean", "std")}
    return LoadedClassifier(_backbone_and_head(backbone, classifier), classifier.out_features, builder["in_chans"],
                            inputs)


def from_timm(owner: str, name: str, weights_path: str, kwargs: dict, in_chans: int | None,
              role: str = "teacher") -> LoadedClassifier:
    if not timm.is_model(name):
        raise ValueError(f"{owner}: {role}_timm={name!r} is not a timm model name (see timm.list_models()).")
    weights = read_state_dict(owner, weights_path, f"{role}_weights")
    kwargs = {"in_chans": in_chans or 3, **kwargs}
    if "num_classes" not in kwargs:  # the class count the weights were trained for
        classifier = get_pretrained_cfg_value(name, "classifier") or "fc"
        classifier = classifier[0] if isinstance(classifier, (list, tuple)) else classifier  # distilled ViTs: two
        found = weights.get(f"{classifier}.weight")
        if found is None:
            raise ValueError(
                f"{owner}: {role}_weights={weights_path} hold no '{classifier}.weight', the classifier of timm's "
                f"{name}, so the class count is unknown: set {role}_timm_kwargs num_classes, or give {name}'s weights."
            )
        kwargs["num_classes"] = found.shape[0]
    model = timm.create_model(name, pretrained=False, **kwargs)
    load_exactly(owner, role, model, weights, f"timm's {name} ({kwargs})", f"{role}_weights={weights_path}")
    return LoadedClassifier(model, model.num_classes, kwargs["in_chans"], {})


def _backbone_and_head(backbone: nn.Module, head: nn.Module) -> nn.Module:
    # FSDP's policy makes the timm backbone and the LinearClassifier units; the Sequential holds both.
    return nn.Sequential(OrderedDict(backbone=backbone.eval(), head=head))


def _linear_head(owner: str, role: str, state: dict[str, Tensor], source: str) -> LinearClassifier:
    weight, bias = state.get("weight"), state.get("bias")
    if weight is None or weight.dim() != 2 or bias is None or bias.shape != weight.shape[:1]:
        shapes = {key: tuple(value.shape) for key, value in state.items()}
        raise ValueError(
            f"{owner}: {source} is not a linear classifier head: it needs 'weight' [C, D] and 'bias' [C], got {shapes}."
        )
    head = LinearClassifier(weight.shape[1], weight.shape[0])
    load_exactly(owner, role, head, {"weight": weight, "bias": bias}, "a linear classifier head", source)
    return head


def read_state_dict(owner: str, path: str, argument: str) -> dict[str, Tensor]:
    """A state dict from ``.safetensors`` or a torch file read with ``weights_only=True``; a
    ``{"state_dict"|"model": ...}`` wrapper and a ``module.`` prefix (DataParallel) are removed."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{owner}: {argument}: file not found: {file}")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(file))
    try:
        loaded = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types; its message advises an unsafe load
        first_line = (str(error).strip().splitlines() or ["no message"])[0][:200]
        raise ValueError(
            f"{owner}: {argument}={file} cannot be read with torch.load(weights_only=True) ({type(error).__name__}: "
            f"{first_line}). Save the weights as a plain state dict (torch.save(model.state_dict(), path)) or as "
            ".safetensors."
        ) from None
    if isinstance(loaded, dict):
        for wrapper in ("state_dict", "model"):
            if isinstance(loaded.get(wrapper), dict):
                loaded = loaded[wrapper]
                break
    if not isinstance(loaded, dict) or not loaded or not all(isinstance(value, Tensor) for value in loaded.values()):
        raise ValueError(f"{owner}: {argument}={file} does not hold a state dict (names -> tensors).")
    if all(key.startswith("module.") for key in loaded):
        loaded = {key[len("module."):]: value for key, value in loaded.items()}
    return loaded


def load_exactly(owner: str, role: str, module: nn.Module, state: dict[str, Tensor], architecture: str,
                 source: str) -> None:
    """``module.load_state_dict(state, strict=True)``, or an error naming a few missing, unexpected
    and reshaped keys: weights of another architecture than the one built."""
    expected = module.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    reshaped = [f"{key} {tuple(state[key].shape)} vs {tuple(expected[key].shape)}"
                for key in expected if key in state and state[key].shape != expected[key].shape]
    problems = [f"{what} ({len(keys)}): {_few(keys)}" for what, keys in
                (("missing", missing), ("unexpected", unexpected), ("other shape, file vs model", reshaped)) if keys]
    if problems:
        raise ValueError(
            f"{owner}: the {role} weights in {source} do not fit {architecture}, another architecture: "
            f"{'; '.join(problems)}. Build the architecture the weights were trained with."
        )
    module.load_state_dict(state, strict=True)


def _few(keys: list[str], shown: int = 4) -> str:
    return ", ".join(keys[:shown]) + (", ..." if len(keys) > shown else "")
