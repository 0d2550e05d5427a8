"""Write the predictions of a whole split (embeddings, logits) to one ``.npz`` during ``predict``."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from ssl_lightning.distributed import gather
from ssl_lightning.metrics.knn import unique_by_index

#: what every ``predict_step`` returns besides its tensors of choice
REQUIRED = ("label", "index")


class EmbeddingWriter(BasePredictionWriter):
    """Saves every tensor ``predict_step`` returns for the un-augmented ``split`` ("val" or "train") to
    ``output_path`` as a ``.npz``: a self-supervised method's ``feats`` (backbone) and ``embeds``
    (projector), a classifier's ``feats``, ``logits`` and ``probs``, with ``label`` and ``index`` (rows
    sorted by dataset index, plus ``split``). A relative ``output_path`` lies in the run directory
    (``trainer.default_root_dir``).

    Rows are gathered across ranks, de-duplicated by ``index`` (DistributedSampler pads) and written
    by rank zero. Used with ``python -m ssl_lightning predict``; the method's ``predict_step`` returns
    the rows.
    """

    def __init__(self, output_path: str = "embeddings.npz", split: Literal["train", "val"] = "val"):
        # Per batch, not per epoch: epoch-interval writers rely on Lightning keeping every
        # prediction, which it does not under spawn-based strategies.
        super().__init__(write_interval="batch")
        if split not in ("train", "val"):
            raise ValueError(f"EmbeddingWriter(split={split!r}): split must be 'train' or 'val'")
        self.output_path = Path(output_path)
        self.split = split
        self._rows: list[dict[str, torch.Tensor]] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        datamodule = trainer.datamodule
        if datamodule is not None and hasattr(datamodule, "predict_split"):
            datamodule.predict_split = self.split
        elif self.split != "val":
            raise ValueError(
                f"EmbeddingWriter(split={self.split!r}) needs an ssl_lightning DataModule to choose the split; "
                "with plain dataloaders the loader decides and split must stay 'val'."
            )

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._rows = []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        missing = [key for key in REQUIRED if key not in prediction]
        if missing:
            raise KeyError(f"EmbeddingWriter: predict_step must return {REQUIRED} with its tensors; missing {missing}.")
        row = {key: value.detach() for key, value in prediction.items() if isinstance(value, torch.Tensor)}
        if self._rows and row.keys() != self._rows[0].keys():
            raise KeyError(f"EmbeddingWriter: predict_step returned {sorted(row)} after {sorted(self._rows[0])}.")
        self._rows.append(row)

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._rows:
            raise RuntimeError("EmbeddingWriter: no batches were predicted; nothing to write.")
        columns = {key: gather(torch.cat([row[key] for row in self._rows])) for key in self._rows[0]}
        self._rows = []
        index = columns["index"]
        # unique_by_index keeps the first row of each index, in index order.
        arrays = dict(zip(columns, (t.float().cpu().numpy() if t.is_floating_point() else t.cpu().numpy()
                                    for t in unique_by_index(index, *columns.values()))))
        if trainer.is_global_zero:
            path = Path(trainer.default_root_dir) / self.output_path
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(path, split=np.array(self.split), **arrays)
            rank_zero_info(f"EmbeddingWriter: wrote {len(arrays['index'])} rows of the {self.split} split to {path}")
