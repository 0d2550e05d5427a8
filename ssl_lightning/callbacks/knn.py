"""Online weighted k-nearest-neighbour accuracy of the current representation (the maths: ``metrics.knn``)."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from ssl_lightning.datamodules.base import BANK, QUERIES
from ssl_lightning.metrics.knn import gather_labelled_rows, knn_accuracy


class KNNCallback(L.Callback):
    """Logs ``val/knn_top1`` and ``val/knn_top5`` (fractions in [0, 1]) at the end of a validation epoch.

    The bank is the un-augmented training set (the DataModule adds it as a second validation
    dataloader when asked); queries are the validation set. Embeddings are gathered across ranks
    and de-duplicated by ``index``. Skipped during the sanity check.

    Args:
        k: neighbours. k=200, temperature=0.1 are the CIFAR (and ImageNet) defaults of Wu et al.,
            DINO and solo-learn; use k=20 for small data sets (a few thousand images, e.g. Digits),
            where 200 neighbours span several classes.
        temperature: vote temperature.
        feature_key: which output of ``validation_step`` to use ("feats" = backbone, "embeds" = projector).
        every_n_epochs: compute kNN accuracy after every n-th epoch only (epochs n, 2n, ...). In the
            other epochs no embeddings are kept, gathered or compared; the validation loop still runs
            the model over the bank dataloader.
    """

    def __init__(self, k: int = 20, temperature: float = 0.1, feature_key: str = "feats", every_n_epochs: int = 1):
        if every_n_epochs < 1:
            raise ValueError(f"KNNCallback: every_n_epochs must be >= 1, got {every_n_epochs}.")
        self.k = k
        self.temperature = temperature
        self.feature_key = feature_key
        self.every_n_epochs = every_n_epochs
        self._outputs: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        request = getattr(trainer.datamodule, "request_knn_bank", None)
        if request is None:
            raise ValueError(
                "KNNCallback needs a DataModule with request_knn_bank() (any ssl_lightning DataModule) "
                "to validate against the un-augmented training set; pass datamodule= to the Trainer."
            )
        request()

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._outputs = {QUERIES: [], BANK: []}

    def _active(self, trainer: L.Trainer) -> bool:
        return not trainer.sanity_checking and (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not self._active(trainer):
            return
        if self.feature_key not in outputs:
            raise KeyError(
                f"KNNCallback(feature_key={self.feature_key!r}): validation_step returned {sorted(outputs)}."
            )
        row = (outputs[self.feature_key].detach(), outputs["label"].detach(), outputs["index"].detach())
        self._outputs[dataloader_idx].append(row)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._active(trainer):
            return
        queries, query_labels = self._collect(QUERIES)
        bank, bank_labels = self._collect(BANK)
        self._outputs = {}
        if queries is None or bank is None:
            rank_zero_warn("KNNCallback: no validation or bank batches were seen; kNN accuracy not logged.")
            return
        result = knn_accuracy(queries, query_labels, bank, bank_labels, self.k, self.temperature)
        for name, value in result.items():
            # Every rank holds the same gathered data, hence the same value: no sync needed.
            # Logged as a fraction, like every accuracy metric (torchmetrics' convention).
            pl_module.log(f"val/knn_{name}", value / 100.0, prog_bar=name == "top1", add_dataloader_idx=False)

    def _collect(self, dataloader_idx: int):
        rows = self._outputs.get(dataloader_idx) or []
        return gather_labelled_rows(rows) if rows else (None, None)
