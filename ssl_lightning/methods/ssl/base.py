"""``SSLMethod``: what self-supervised methods add to the shared ``TrainModule``.

The view-count contract (two views by default), the online linear probe on detached features,
``embed``: the backbone's features and the projector's embeddings, which the monitors read, and
MSBReg's singular value loss as a regulariser any method can switch on (``singular_value_weight``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from ssl_lightning.components.probe import OnlineProbe
from ssl_lightning.core.data_link import require_views
from ssl_lightning.core.module import TrainModule
from ssl_lightning.core.step_logging import log_labelled_accuracy
from ssl_lightning.losses import singular_value_loss
from ssl_lightning.optim import param_groups
from ssl_lightning.strategies import warn_if_batchnorm_is_per_process

#: the loss term the singular value regulariser adds to ``shared_step``'s output (unweighted, detached)
SINGULAR_VALUE_TERM = "loss/singular_value"


class SSLMethod(TrainModule):
    """Base class of self-supervised methods.

    Subclasses implement ``build_heads(feat_dim)`` and ``shared_step(batch)`` (see
    :class:`~ssl_lightning.core.module.TrainModule`), set ``expected_views`` when they take other
    than two views, and override ``embed(images)`` when their embedding is not ``projector(feats)``.

    With ``num_classes`` set (the DataModule links it), an online linear probe trains on the
    detached ``feats`` of ``shared_step`` (labels -1 masked), with its own LR: ``train/probe_loss``
    and ``train/probe_top1`` on logger steps, ``val/probe_top1`` each validation.

    With ``singular_value_weight`` > 0, every ``shared_step`` adds ``weight x singular_value_loss(embeds)``
    to its loss (MSBReg's global dispersion, which the paper also adds to other methods; see
    :func:`~ssl_lightning.losses.singular_value_loss`), over the global batch, and returns the unweighted
    term as ``loss/singular_value``. ``embeds`` is what ``shared_step`` returns under that key: the
    projector's output of the first view in most methods. A method that returns none (DINO, iBOT,
    Random Teachers, MAE) stops with an error at its first step.

    Defaults are SimCLR's LARS recipe (LR 0.3 per 256 images, weight decay 1e-6, 10 warm-up
    epochs); every argument of ``TrainModule`` is accepted.

    Args:
        probe_lr: learning rate (per 256 images) of the online linear probe.
        singular_value_weight: weight of the singular value regulariser on ``embeds``; 0 (the default)
            leaves the method's loss as it is.
        **kwargs: backbone, data, optimizer and schedule arguments of :class:`TrainModule`.
    """

    expected_views: int | tuple[int, int] = 2

    def __init__(self, probe_lr: float = 0.1, singular_value_weight: float = 0.0, **kwargs: Any):
        if not (math.isfinite(singular_value_weight) and singular_value_weight >= 0):
            raise ValueError(
                f"{type(self).__name__}: singular_value_weight must be a finite number >= 0 (0 turns the "
                f"singular value regulariser off), got {singular_value_weight}"
            )
        super().__init__(**kwargs)
        self.probe: OnlineProbe | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Every method's own shared_step gets the regulariser, whoever calls it (training_step, tests).
        super().__init_subclass__(**kwargs)
        if "shared_step" in cls.__dict__:
            cls.shared_step = _with_singular_value_term(cls.__dict__["shared_step"])

    def add_singular_value_term(self, out: dict[str, torch.Tensor], weight: float) -> dict[str, torch.Tensor]:
        """``out`` with ``weight x singular_value_loss(out["embeds"])`` added to its loss, and the term."""
        embeds = out.get("embeds")
        if embeds is None:
            name = type(self).__name__
            raise ValueError(
                f"{name}: singular_value_weight={weight} regularises the embeddings shared_step returns as "
                f"'embeds', and {name}.shared_step returns none (it returned {sorted(out)}). Set "
                "singular_value_weight: 0 for this method, or return its embeddings under 'embeds'."
            )
        term = singular_value_loss(embeds)
        return {**out, "loss": out["loss"] + weight * term, SINGULAR_VALUE_TERM: term.detach()}

    def configure_model(self) -> None:
        super().configure_model()
        if self.probe is None and self.hparams.num_classes:
            self.probe = OnlineProbe(self.feat_dim, self.hparams.num_classes)
            self.val_probe_top1 = MulticlassAccuracy(self.hparams.num_classes, average="micro")

    def embed(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.backbone(images)
        return {"feats": feats, "embeds": self.projector(feats)}

    def parameter_groups(self) -> list[dict]:
        student = nn.ModuleList(module for name, module in self.named_children() if name != "probe")
        groups = param_groups(student, self.hparams.weight_decay)
        if self.probe is not None:
            groups.append({"name": "probe", "params": list(self.probe.parameters()), "weight_decay": 0.0,
                           "base_lr": self.hparams.probe_lr})
        return groups

    def training_extras(self, batch: dict, out: dict[str, torch.Tensor], logs_now: bool) -> torch.Tensor | None:
        if self.probe is None or "feats" not in out:
            return None
        probe_loss, logits = self.probe.loss(out["feats"], batch["label"])  # masks, so no host sync
        if logs_now:
            labelled = log_labelled_accuracy(self, logits, batch["label"], {1: "train/probe_top1"})
            if labelled:  # the loss is already the global mean over the labelled images
                self.log("train/probe_loss", probe_loss.detach(), batch_size=labelled)
        return probe_loss

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        require_views(batch, type(self).__name__)
        out = self.embed(batch["views"][0])
        labels = batch["label"]
        if dataloader_idx == 0 and self.probe is not None and (labels >= 0).any():
            labelled = labels >= 0
            self.val_probe_top1(self.probe(out["feats"][labelled]), labels[labelled])
            self.log("val/probe_top1", self.val_probe_top1, prog_bar=True, add_dataloader_idx=False)
        return {**out, "label": labels, "index": batch["index"]}

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        require_views(batch, type(self).__name__)
        return {**self.embed(batch["views"][0]), "label": batch["label"], "index": batch["index"]}

    def on_fit_start(self) -> None:
        warn_if_batchnorm_is_per_process(self, self.trainer.world_size)  # after Lightning's SyncBatchNorm swap


def _with_singular_value_term(shared_step: Callable) -> Callable:
    @functools.wraps(shared_step)
    def regularised_step(self: SSLMethod, batch: dict) -> dict[str, torch.Tensor]:
        out = shared_step(self, batch)
        weight = self.hparams.get("singular_value_weight", 0.0)
        # Already there when an overriding shared_step returns its parent's output (added once only).
        if not weight or SINGULAR_VALUE_TERM in out:
            return out
        return self.add_singular_value_term(out, weight)

    return regularised_step
