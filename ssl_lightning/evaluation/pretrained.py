"""What every offline evaluation shares: the backbone of a method checkpoint, the DataModule's facts,
and the results files (one JSON per result and a Markdown table in the run directory)."""

from __future__ import annotations

from typing import Any

import lightning as L
from torch import nn

from ssl_lightning.backbones import feature_dim
from ssl_lightning.evaluation.results import write_result
from ssl_lightning.export import builder_args, load_checkpoint, rebuild_backbone


class PretrainedBackboneModule(L.LightningModule):
    """Base of evaluations that start from a method checkpoint's backbone.

    The backbone is loaded in ``configure_model`` (not ``__init__``) so that configs instantiate
    without a checkpoint. Subclasses decide whether it trains (``FineTune``) or stays frozen
    (``FrozenBackboneModule``).

    Args:
        pretrained: path of a method checkpoint written by ``fit`` (see ``ssl_lightning.load_backbone``).
        num_classes, batch_size, in_chans, image_size: the DataModule's, linked by the CLI (read in
            ``setup`` from Python); ``in_chans`` must match the checkpoint's backbone.
    """

    def __init__(
        self,
        pretrained: str,
        num_classes: int | None = None,
        batch_size: int | None = None,
        in_chans: int | None = None,
        image_size: int | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.backbone: nn.Module | None = None
        self.feat_dim: int | None = None
        #: the checkpoint's builder arguments of the backbone (``build_backbone(**backbone_builder)``)
        self.backbone_builder: dict[str, Any] | None = None

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        for key in ("num_classes", "batch_size", "in_chans", "image_size"):
            if self.hparams.get(key) is None and getattr(datamodule, key, None) is not None:
                self.hparams[key] = getattr(datamodule, key)

    def configure_model(self) -> None:
        if self.backbone is None:
            self.load_pretrained_backbone()

    def load_pretrained_backbone(self, **builder_kwargs: Any) -> dict:
        """Set ``backbone`` (eval mode, the checkpoint's weights), ``feat_dim`` and ``backbone_builder``
        (the checkpoint's own builder arguments); ``builder_kwargs`` join them for this build only (e.g.
        ``drop_path_rate``). Returns the checkpoint, whose other modules a subclass may read (FineTune's
        projector blocks)."""
        path = self.hparams.pretrained
        checkpoint = load_checkpoint(path)
        self.backbone_builder = builder_args(checkpoint, path)
        backbone, builder = rebuild_backbone(checkpoint, path, builder_kwargs)
        data_chans = self.hparams.in_chans
        if data_chans is not None and data_chans != builder["in_chans"]:
            raise ValueError(
                f"{path}: the backbone takes {builder['in_chans']}-channel images but the DataModule yields "
                f"{data_chans}-channel ones; evaluate on the data the backbone was trained for."
            )
        self.backbone = backbone
        self.feat_dim = feature_dim(backbone, builder["in_chans"], self.hparams.image_size or 32)
        return checkpoint

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.configure_model()

    def write_result(self, protocol: str, metric: str, value: float, epochs: int | None, split: str = "val") -> None:
        """``<metric>.json`` and a line of ``results.md`` in the run directory (see ``evaluation.results``)."""
        write_result(self.trainer, protocol, metric, value, epochs, self.hparams.pretrained, split)
