"""Offline kNN evaluation of a method checkpoint's frozen backbone (``validate`` subcommand)."""

from __future__ import annotations

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from ssl_lightning.datamodules.base import BANK, QUERIES
from ssl_lightning.evaluation.frozen import FrozenBackboneModule
from ssl_lightning.metrics.knn import gather_labelled_rows, knn_accuracy


class KNNEvaluation(FrozenBackboneModule):
    """Weighted kNN top-1 / top-5 of a checkpoint's backbone ``feats`` (eval mode), for each k in ``ks``.

    Protocol (Wu et al. 2018; DINO, solo-learn): cosine similarity of L2-normalised features, the k
    nearest bank images vote for their label with weight ``exp(similarity / temperature)``; bank =
    the un-augmented training split, queries = the validation split. Logs ``val/knn_top1_k<k>`` and
    ``val/knn_top5_k<k>`` (fractions; the result files hold percent) and writes ``knn_top1_k<k>.json`` and lines of ``results.md``
    into the run directory. Run with ``python -m ssl_lightning validate``.

    Args:
        pretrained: method checkpoint whose backbone is evaluated.
        ks: numbers of neighbours (20 and 200 by default: 200 is the CIFAR/ImageNet standard,
            20 suits small data sets).
        temperature: vote temperature.
    """

    def __init__(
        self,
        pretrained: str,
        ks: tuple[int, ...] = (20, 200),
        temperature: float = 0.1,
        num_classes: int | None = None,
        batch_size: int | None = None,
        in_chans: int | None = None,
        image_size: int | None = None,
    ):
        super().__init__(pretrained, num_classes, batch_size, in_chans, image_size)
        self._rows: dict[int, list[tuple[torch.Tensor, ...]]] = {}

    def setup(self, stage: str) -> None:
        super().setup(stage)
        request = getattr(self.trainer.datamodule, "request_knn_bank", None)
        if request is None:
            raise ValueError("KNNEvaluation needs an ssl_lightning DataModule (one with request_knn_bank()).")
        request()

    def on_validation_epoch_start(self) -> None:
        self._rows = {QUERIES: [], BANK: []}

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        feats = self.backbone(batch["views"][0]).float()
        self._rows[dataloader_idx].append((feats, batch["label"], batch["index"]))

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        (queries, query_labels), (bank, bank_labels) = self._collect(QUERIES), self._collect(BANK)
        self._rows = {}
        lines = [f"kNN (cosine, T={self.hparams.temperature}; bank = train split, queries = val split):"]
        for k in self.hparams.ks:
            result = knn_accuracy(queries, query_labels, bank, bank_labels, k, self.hparams.temperature)
            for name, value in result.items():
                self.log(f"val/knn_{name}_k{k}", value / 100.0, sync_dist=False)  # fractions, as all logged accuracies
            lines.append(f"  k={k:<4} top-1 {result['top1']:6.2f}%")
            protocol = (f"weighted kNN on frozen backbone feats, k={k}, T={self.hparams.temperature}, cosine, "
                        "bank = train split")
            self.write_result(protocol, f"knn_top1_k{k}", result["top1"], epochs=None)
        rank_zero_info("\n".join(lines))

    def _collect(self, dataloader_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self._rows.get(dataloader_idx) or []
        if not rows:
            raise RuntimeError("KNNEvaluation: a validation or bank loader yielded no batches (limit_val_batches=0?).")
        return gather_labelled_rows(rows)
