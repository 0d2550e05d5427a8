"""The frozen teacher of knowledge distillation: a trained classifier (images -> logits), owned by the
student by composition, never trained, and by default never saved in the student's checkpoints."""

from __future__ import annotations

import hashlib
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
#: how a user makes a classifier checkpoint, named in errors
TRAIN_A_TEACHER = ("train one with `python -m ssl_lightning fit --config configs/cifar10/classifier.yaml --run_name "
                   "cifar10-teacher`, which writes runs/cifar10-teacher/checkpoints/last.ckpt")


@dataclass
class LoadedTeacher:
    """What a loader returns: the images -> logits module and what is known about its inputs."""

    model: nn.Module
    num_classes: int
    in_chans: int | None
    #: image_size, mean, std the teacher was trained with (None where unknown)
    inputs: dict[str, Any] = field(default_factory=dict)


class FrozenTeacher(nn.Module):
    """A trained classifier that teaches a student: frozen, always in eval mode, and left out of the
    student's checkpoints unless asked.

    Exactly one source (checked here; read only by :meth:`load`, which a method calls in
    ``setup("fit")``, so a student is validated, tested or exported without its teacher):

    * ``ckpt``: one of our checkpoints written by ``fit`` of a supervised method (``Classifier`` or a
      distilled student): backbone rebuilt from its hyperparameters, ``head.`` its classifier. A
      checkpoint without a classifier head (a self-supervised method's) is refused.
    * ``ckpt`` ending in ``.safetensors``: a backbone written by ``python -m ssl_lightning export``
      (its ``.json`` beside it says how to build it). Export writes the backbone only, not the
      classifier head, so ``head`` must name a file with the head's ``weight`` [C, D] and ``bias`` [C]
      (``.safetensors`` or a torch state dict; ``head.``-prefixed keys are accepted).
    * ``timm_name`` + ``weights``: ``timm.create_model(timm_name, **timm_kwargs)`` with its classifier,
      and a local state dict (``.safetensors``, or ``.pth``/``.pt``/``.bin`` read with
      ``weights_only=True``; a ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper and a
      ``module.`` prefix are removed). The class count comes from the weights' classifier unless
      ``timm_kwargs`` sets ``num_classes``; ``in_chans`` defaults to the student's.
    * ``module``: any ``nn.Module`` mapping images to logits, given in Python (frozen in place).

    Every file is read with ``weights_only=True`` (or safetensors). Bad input stops with the reason: a
    teacher whose class count differs from the data's (both numbers), weights from another
    architecture (a few missing, unexpected and reshaped keys each), a checkpoint that is not a
    classifier's. A teacher trained with another normalisation (mean, std) than the student's data
    gets a warning: it would see images unlike its training images.

    Frozen: its parameters never require gradients (so they stay out of the optimizer), its forward
    runs under ``torch.no_grad()``, and ``train()`` keeps it in eval mode, so BatchNorm uses the
    teacher's running statistics, which never change, and dropout is off. The student's augmented
    view goes through it online.

    Checkpoints: the teacher's weights are dropped from ``state_dict()`` unless ``save_in_checkpoint``
    (the student's ``save_teacher``); a SHA-256 fingerprint of them (32 bytes, ``_extra_state``) is
    always kept. On resume the teacher is loaded again from its source, and a source whose weights no
    longer match the fingerprint stops the run (the student would go on learning from another
    teacher). Loading a student checkpoint stays strict: missing teacher weights are expected when
    they were not saved, and saved ones are ignored when the teacher is not loaded (``test``,
    ``load_from_checkpoint``).

    Args:
        owner: the student's name, for messages.
        ckpt, head, timm_name, weights, timm_kwargs, module: the source, as above.
        save_in_checkpoint: keep the teacher's weights in the student's checkpoints.
    """

    def __init__(
        self,
        owner: str,
        ckpt: str | None = None,
        head: str | None = None,
        timm_name: str | None = None,
        weights: str | None = None,
        timm_kwargs: dict[str, Any] | None = None,
        module: nn.Module | None = None,
        save_in_checkpoint: bool = False,
    ):
        super().__init__()
        self.owner = owner
        self.ckpt, self.head_file, self.timm_name, self.weights = ckpt, head, timm_name, weights
        self.timm_kwargs = dict(timm_kwargs or {})
        self.save_in_checkpoint = save_in_checkpoint
        self._check_one_source(module)
        self._given_name = type(module).__name__ if module is not None else None
        self.model: nn.Module | None = None
        self.num_classes: int | None = None
        self._teacher_in_chans: int | None = None
        self.inputs: dict[str, Any] = {}
        self._fingerprint = torch.empty(0, dtype=torch.uint8)
        self._load_prefix, self._weights_in_checkpoint = "", False
        self.register_state_dict_post_hook(_drop_teacher_weights)
        self.register_load_state_dict_pre_hook(_before_loading)
        self.register_load_state_dict_post_hook(_after_loading)
        if module is not None:  # a Python module is ready now: shared_step works without a Trainer
            declared = getattr(module, "num_classes", None)
            self._adopt(LoadedTeacher(module, declared if isinstance(declared, int) else None, None))
        self.eval()

    # ----------------------------------------------------------------- source
    def _check_one_source(self, module: nn.Module | None) -> None:
        given = [name for name, value in (("teacher_ckpt", self.ckpt), ("teacher_timm", self.timm_name),
                                          ("teacher", module)) if value is not None]
        if len(given) > 1:
            raise ValueError(f"{self.owner}: give one teacher source, got {' and '.join(given)}.")
        if self.weights is not None and self.timm_name is None:
            raise ValueError(
                f"{self.owner}: teacher_weights={self.weights!r} are the weights of a timm model: set teacher_timm to "
                "its name. (For one of our checkpoints use teacher_ckpt alone.)"
            )
        if self.timm_name is not None and self.weights is None:
            raise ValueError(
                f"{self.owner}: teacher_timm={self.timm_name!r} needs teacher_weights, a local file with the trained "
                "teacher's state dict (.pth or .safetensors); a randomly initialised teacher teaches nothing."
            )
        if self.head_file is not None and not self._is_export():
            raise ValueError(
                f"{self.owner}: teacher_head={self.head_file!r} goes with an exported backbone (teacher_ckpt ending in "
                ".safetensors); a .ckpt holds its head already."
            )

    def _is_export(self) -> bool:
        return self.ckpt is not None and Path(self.ckpt).suffix == ".safetensors"

    def describe(self) -> str:
        """The source, as the user wrote it."""
        if self._given_name is not None:
            return f"the teacher module {self._given_name} given in Python"
        if self.timm_name is not None:
            return f"teacher_timm={self.timm_name!r} with teacher_weights={self.weights}"
        if self._is_export():
            return f"teacher_ckpt={self.ckpt} (exported backbone) with teacher_head={self.head_file}"
        return f"teacher_ckpt={self.ckpt}"

    # ----------------------------------------------------------------- loading
    @property
    def loaded(self) -> bool:
        return self.model is not None

    def load(self, num_classes: int | None, in_chans: int | None, datamodule: Any = None,
             channels_last: bool = False) -> None:
        """Load the teacher from its source (once) and check it against the student's data: the class
        count (``num_classes``, the data's), the input channels and, with ``datamodule``, the
        normalisation (its ``mean`` and ``std``)."""
        if self.model is None:
            self._adopt(self._read_source(in_chans))
            if channels_last:
                self.model.to(memory_format=torch.channels_last)
        if num_classes is not None and self.num_classes is not None and self.num_classes != num_classes:
            raise ValueError(
                f"{self.owner}: the teacher ({self.describe()}) predicts {self.num_classes} classes, but the data has "
                f"{num_classes} (num_classes={num_classes}). Distil a teacher trained on the same classes."
            )
        if in_chans is not None and self._teacher_in_chans is not None and self._teacher_in_chans != in_chans:
            raise ValueError(
                f"{self.owner}: the teacher ({self.describe()}) takes {self._teacher_in_chans}-channel images, but the "
                f"data has {in_chans} channels. Distil a teacher trained on the same kind of images."
            )
        self._warn_if_normalised_otherwise(datamodule)

    def _read_source(self, in_chans: int | None) -> LoadedTeacher:
        if self.timm_name is not None:
            return _from_timm(self.owner, self.timm_name, self.weights, self.timm_kwargs, in_chans)
        if self.ckpt is None:
            raise ValueError(
                f"{self.owner} needs a teacher, and none was given. Pass --model.init_args.teacher_ckpt <a Classifier "
                f"checkpoint> ({TRAIN_A_TEACHER}), or teacher_timm with teacher_weights, or an exported backbone "
                "(teacher_ckpt <file>.safetensors) with teacher_head, or teacher=<nn.Module> in Python."
            )
        if self._is_export():
            return _from_export(self.owner, self.ckpt, self.head_file)
        return _from_checkpoint(self.owner, self.ckpt)

    def _adopt(self, loaded: LoadedTeacher) -> None:
        loaded.model.requires_grad_(False)
        self.model = loaded.model.eval()
        self.num_classes = loaded.num_classes
        self._teacher_in_chans = loaded.in_chans
        self.inputs = loaded.inputs
        self._fingerprint = weights_fingerprint(self.model)

    def _warn_if_normalised_otherwise(self, datamodule: Any) -> None:
        for key in ("mean", "std"):
            ours, theirs = getattr(datamodule, key, None), self.inputs.get(key)
            if ours is None or theirs is None:
                continue
            if len(ours) != len(theirs) or any(abs(a - b) > 1e-4 for a, b in zip(ours, theirs)):
                warnings.warn(
                    f"{self.owner}: the teacher ({self.describe()}) was trained on images normalised with {key} "
                    f"{list(theirs)}, but the student's DataModule uses {list(ours)}: the teacher sees images unlike "
                    "its training images and its soft labels suffer. Use the teacher's data settings.",
                    stacklevel=2,
                )

    # ----------------------------------------------------------------- use
    def forward(self, images: Tensor) -> Tensor:
        """The teacher's logits, without gradients."""
        if self.model is None:
            raise RuntimeError(
                f"{self.owner}: the teacher ({self.describe()}) is not loaded. Trainer.fit loads it (setup('fit')); "
                "outside a Trainer call model.teacher.load(num_classes, in_chans) first."
            )
        with torch.no_grad():
            return self.model(images)

    def train(self, mode: bool = True) -> FrozenTeacher:
        """Always eval mode, whatever the owner's mode: running BatchNorm statistics, no dropout."""
        return super().train(False)

    # ----------------------------------------------------------------- checkpoints
    def get_extra_state(self) -> Tensor:
        return self._fingerprint

    def set_extra_state(self, state: Tensor) -> None:
        state = state.detach().cpu()
        if self.model is None or self._weights_in_checkpoint:
            self._fingerprint = state.clone()  # its weights load next, or it is kept for the next save
        elif state.numel() and not torch.equal(state, self._fingerprint):
            raise ValueError(
                f"{self.owner}: the teacher loaded from {self.describe()} is not the teacher this checkpoint was "
                f"trained with (weight fingerprints {_hex(self._fingerprint)} and {_hex(state)} differ). Point the "
                "teacher arguments at the original teacher, or start a new run; save_teacher=True keeps the teacher "
                "in the student's checkpoints."
            )


def _drop_teacher_weights(module: FrozenTeacher, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    if module.save_in_checkpoint:
        return
    for key in [key for key in state_dict if key.startswith(prefix) and key != prefix + "_extra_state"]:
        del state_dict[key]


def _before_loading(module: FrozenTeacher, state_dict: dict, prefix: str, *args) -> None:
    weights = [key for key in state_dict if key.startswith(prefix) and key != prefix + "_extra_state"]
    module._load_prefix, module._weights_in_checkpoint = prefix, bool(weights)
    if module.model is None:  # not loaded (not fitting): saved teacher weights have nothing to go to
        for key in weights:
            del state_dict[key]  # this module's own copy of the state dict (torch filters one per child)


def _after_loading(module: FrozenTeacher, incompatible) -> None:
    if module.model is not None and not module._weights_in_checkpoint:  # not saved: the source's weights stay
        weights = module._load_prefix
        incompatible.missing_keys[:] = [
            key for key in incompatible.missing_keys
            if not key.startswith(weights) or key == weights + "_extra_state"
        ]


def weights_fingerprint(module: nn.Module) -> Tensor:
    """SHA-256 of a module's state dict (names, dtypes, shapes and bytes), as 32 uint8 values."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return torch.tensor(list(digest.digest()), dtype=torch.uint8)


def _hex(fingerprint: Tensor) -> str:
    return bytes(fingerprint.tolist()).hex()[:12]


# --------------------------------------------------------------------- loaders
def _from_checkpoint(owner: str, path: str) -> LoadedTeacher:
    try:
        checkpoint = load_checkpoint(path)  # weights_only=True; refuses files that are not a method's checkpoint
        builder = builder_args(checkpoint, path)
    except ValueError as error:
        raise ValueError(f"{owner}: teacher_ckpt: {error}") from None
    state = checkpoint["state_dict"]
    head = {key[len(HEAD_PREFIX):]: value for key, value in state.items() if key.startswith(HEAD_PREFIX)}
    if "weight" not in head or head["weight"].dim() != 2:
        modules = sorted({key.split(".", 1)[0] for key in state})
        raise ValueError(
            f"{owner}: teacher_ckpt={path} is not a classifier checkpoint: it has no classifier head ('head.weight'; "
            f"its modules: {', '.join(modules)}). Distillation needs a classifier checkpoint, of Classifier or of a "
            f"distilled student: {TRAIN_A_TEACHER}, or fine-tune this checkpoint's backbone first."
        )
    backbone = build_backbone(**builder)
    load_exactly(owner, backbone, backbone_state_dict(checkpoint), f"{builder['name']} (the backbone its "
                 f"hyperparameters describe)", f"teacher_ckpt={path} ('{PREFIX}' entries)")
    classifier = _linear_head(owner, head, f"teacher_ckpt={path} ('head.' entries)")
    return LoadedTeacher(_backbone_and_head(backbone, classifier), classifier.out_features, builder["in_chans"],
                         input_facts(checkpoint))


def _from_export(owner: str, path: str, head_path: str | None) -> LoadedTeacher:
    from safetensors.torch import load_file

    backbone_file, description_file = Path(path), Path(path).with_suffix(".json")
    for file, what in ((backbone_file, "exported backbone"), (description_file, "export's description")):
        if not file.is_file():
            raise FileNotFoundError(f"{owner}: teacher_ckpt: the {what} {file} is missing (export writes both files).")
    if head_path is None:
        raise ValueError(
            f"{owner}: teacher_ckpt={path} is an exported backbone, and `export` writes the backbone only, without "
            "the classifier head. Give teacher_head, a file with the head's 'weight' [C, D] and 'bias' [C], or use the "
            "checkpoint the backbone was exported from as teacher_ckpt."
        )
    description = json.loads(description_file.read_text())
    builder = description["builder"]
    backbone = build_backbone(**builder)
    load_exactly(owner, backbone, load_file(str(backbone_file)), f"{builder['name']} (as {description_file} says)",
                 f"teacher_ckpt={path}")
    head = {key.removeprefix(HEAD_PREFIX): value for key, value in read_state_dict(owner, head_path, "teacher_head").items()}
    classifier = _linear_head(owner, head, f"teacher_head={head_path}")
    features = description.get("feature_dim") or feature_dim(backbone, builder["in_chans"], description.get("image_size") or 32)
    if classifier.in_features != features:
        raise ValueError(
            f"{owner}: teacher_head={head_path} takes {classifier.in_features}-d features, but the exported backbone "
            f"{path} gives {features}-d ones: give the head trained on this backbone."
        )
    inputs = {key: description.get(key) for key in ("image_size", "mean", "std")}
    return LoadedTeacher(_backbone_and_head(backbone, classifier), classifier.out_features, builder["in_chans"], inputs)


def _from_timm(owner: str, name: str, weights_path: str, kwargs: dict, in_chans: int | None) -> LoadedTeacher:
    if not timm.is_model(name):
        raise ValueError(f"{owner}: teacher_timm={name!r} is not a timm model name (see timm.list_models()).")
    weights = read_state_dict(owner, weights_path, "teacher_weights")
    kwargs = {"in_chans": in_chans or 3, **kwargs}
    if "num_classes" not in kwargs:  # the class count the weights were trained for
        classifier = get_pretrained_cfg_value(name, "classifier") or "fc"
        classifier = classifier[0] if isinstance(classifier, (list, tuple)) else classifier  # distilled ViTs: two
        found = weights.get(f"{classifier}.weight")
        if found is None:
            raise ValueError(
                f"{owner}: teacher_weights={weights_path} hold no '{classifier}.weight', the classifier of timm's "
                f"{name}, so the class count is unknown: set teacher_timm_kwargs num_classes, or give {name}'s weights."
            )
        kwargs["num_classes"] = found.shape[0]
    model = timm.create_model(name, pretrained=False, **kwargs)
    load_exactly(owner, model, weights, f"timm's {name} ({kwargs})", f"teacher_weights={weights_path}")
    return LoadedTeacher(model, model.num_classes, kwargs["in_chans"], {})


def _backbone_and_head(backbone: nn.Module, head: nn.Module) -> nn.Module:
    # FSDP's policy makes the timm backbone and the LinearClassifier units; the Sequential holds both.
    return nn.Sequential(OrderedDict(backbone=backbone.eval(), head=head))


def _linear_head(owner: str, state: dict[str, Tensor], source: str) -> LinearClassifier:
    weight, bias = state.get("weight"), state.get("bias")
    if weight is None or weight.dim() != 2 or bias is None or bias.shape != weight.shape[:1]:
        shapes = {key: tuple(value.shape) for key, value in state.items()}
        raise ValueError(
            f"{owner}: {source} is not a linear classifier head: it needs 'weight' [C, D] and 'bias' [C], got {shapes}."
        )
    head = LinearClassifier(weight.shape[1], weight.shape[0])
    load_exactly(owner, head, {"weight": weight, "bias": bias}, "a linear classifier head", source)
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


def load_exactly(owner: str, module: nn.Module, state: dict[str, Tensor], architecture: str, source: str) -> None:
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
            f"{owner}: the teacher weights in {source} do not fit {architecture}, another architecture: "
            f"{'; '.join(problems)}. Build the architecture the weights were trained with."
        )
    module.load_state_dict(state, strict=True)


def _few(keys: list[str], shown: int = 4) -> str:
    return ", ".join(keys[:shown]) + (", ..." if len(keys) > shown else "")
