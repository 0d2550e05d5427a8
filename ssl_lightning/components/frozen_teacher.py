"""The frozen teacher of knowledge distillation: a trained classifier (images -> logits), owned by the
student by composition, never trained, and by default never saved in the student's checkpoints."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import Tensor, nn

from ssl_lightning.components.classifier_files import ClassifierSource, LoadedClassifier


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
        self.source = ClassifierSource(owner, "teacher", ckpt, head, timm_name, weights, dict(timm_kwargs or {}),
                                       type(module).__name__ if module is not None else None)
        self.save_in_checkpoint = save_in_checkpoint
        self.model: nn.Module | None = None
        self.num_classes: int | None = None
        self._loaded: LoadedClassifier | None = None
        self._fingerprint = torch.empty(0, dtype=torch.uint8)
        self._load_prefix, self._weights_in_checkpoint = "", False
        self.register_state_dict_post_hook(_drop_teacher_weights)
        self.register_load_state_dict_pre_hook(_before_loading)
        self.register_load_state_dict_post_hook(_after_loading)
        if module is not None:  # a Python module is ready now: shared_step works without a Trainer
            declared = getattr(module, "num_classes", None)
            self._adopt(LoadedClassifier(module, declared if isinstance(declared, int) else None, None))
        self.eval()

    # ----------------------------------------------------------------- loading
    def describe(self) -> str:
        """The source, as the user wrote it."""
        return self.source.describe()

    @property
    def loaded(self) -> bool:
        return self.model is not None

    def load(self, num_classes: int | None, in_chans: int | None, datamodule: Any = None,
             channels_last: bool = False) -> None:
        """Load the teacher from its source (once) and check it against the student's data: the class
        count (``num_classes``, the data's), the input channels and, with ``datamodule``, the
        normalisation (its ``mean`` and ``std``)."""
        if self.model is None:
            self._adopt(self.source.read(in_chans))
            if channels_last:
                self.model.to(memory_format=torch.channels_last)
        self.source.check_fits_data(self._loaded, num_classes, in_chans, datamodule)

    def _adopt(self, loaded: LoadedClassifier) -> None:
        loaded.model.requires_grad_(False)
        self.model = loaded.model.eval()
        self.num_classes = loaded.num_classes
        self._loaded = loaded
        self._fingerprint = weights_fingerprint(self.model)

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
