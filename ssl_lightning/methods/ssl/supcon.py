"""SupCon (Khosla et al., NeurIPS 2020): SimCLR whose positives are all views of the same class."""

from __future__ import annotations

from ssl_lightning.components.heads import MLPHead
from ssl_lightning.losses.supcon import supcon
from ssl_lightning.methods.ssl.base import SSLMethod


class SupCon(SSLMethod):
    """Supervised contrastive learning with SimCLR's architecture and recipe (2-layer projector,
    2048 hidden, 128 out, as the paper's; LARS, LR 0.3 per 256 images, weight decay 1e-6) and the
    paper's L_out loss at temperature 0.1. Images labelled -1 are positives only of their own other
    view, so partly labelled data trains too, and unlabelled images give SimCLR's loss. Without
    the official code's t / base_t factor (see :func:`~ssl_lightning.losses.supcon.supcon`).

    Needs ``num_classes`` (a labelled DataModule, or the argument): fitting without it is an error.

    Args:
        temperature: softmax temperature of the loss.
        proj_hidden_dim, proj_dim: projector widths.
        **kwargs: backbone, optimizer and schedule arguments of :class:`SSLMethod`.
    """

    def __init__(self, temperature: float = 0.1, proj_hidden_dim: int = 2048, proj_dim: int = 128, **kwargs):
        super().__init__(**kwargs)  # TrainModule saves every argument in self.hparams

    def build_heads(self, feat_dim: int) -> None:
        self.projector = MLPHead(feat_dim, self.hparams.proj_hidden_dim, self.hparams.proj_dim, num_layers=2)

    def shared_step(self, batch: dict) -> dict:
        view1, view2 = batch["views"]
        feats1, feats2 = self.backbone(view1), self.backbone(view2)
        embeds = self.projector(feats1)
        loss = supcon(embeds, self.projector(feats2), batch["label"], self.hparams.temperature)
        return {"loss": loss, "feats": feats1, "embeds": embeds}

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.hparams.num_classes is None:
            datamodule = getattr(self.trainer, "datamodule", None)
            source = f"the DataModule {type(datamodule).__name__}" if datamodule is not None else "the data"
            raise ValueError(
                f"SupCon needs labelled data: {source} has no classes (num_classes is None); use a labelled "
                "dataset (or pass num_classes= with plain dataloaders whose batches carry labels), or SimCLR "
                "for unlabelled images."
            )
