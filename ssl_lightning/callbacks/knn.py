"""Online weighted k-nearest-neighbour accuracy of the current representation.

Protocol (Wu et al. 2018, as used by DINO and solo-learn): cosine similarity between
L2-normalised embeddings; each of the k nearest bank samples votes for its label with weight
``exp(similarity / temperature)``; the class with the largest summed vote is the prediction.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torchmetrics.functional.classification import multiclass_accuracy

from ssl_lightning.distributed import gather

QUERIES, BANK = 0, 1  # dataloader_idx of the validation set and of the kNN bank


@torch.no_grad()
def knn_scores(
    queries: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.1,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Class scores ``[num_queries, num_classes]`` of weighted kNN (cosine, exp(sim / T) votes).

    Queries are processed in chunks so that memory stays at ``chunk_size x len(bank)``."""
    bank = F.normalize(bank.float(), dim=1)
    k = min(k, bank.shape[0])
    scores = []
    for chunk in F.normalize(queries.float(), dim=1).split(chunk_size):
        similarity, neighbours = (chunk @ bank.T).topk(k, dim=1)
        weights = (similarity / temperature).exp()
        votes = torch.zeros(chunk.shape[0], num_classes, device=chunk.device, dtype=weights.dtype)
        scores.append(votes.scatter_add_(1, bank_labels[neighbours], weights))
    return torch.cat(scores)


def knn_accuracy(
    queries: torch.Tensor, query_labels: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor,
    k: int = 20, temperature: float = 0.1,
) -> dict[str, float]:
    """Top-1 (and top-5 when there are at least 5 classes) accuracy in percent."""
    num_classes = int(torch.cat([bank_labels, query_labels]).max()) + 1
    scores = knn_scores(queries, bank, bank_labels, num_classes, k, temperature)
    result = {"top1": 100.0 * float(multiclass_accuracy(scores, query_labels, num_classes, average="micro"))}
    if num_classes >= 5:
        result["top5"] = 100.0 * float(
            multiclass_accuracy(scores, query_labels, num_classes, average="micro", top_k=5)
        )
    return result


def unique_by_index(index: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Drop rows whose dataset index was already seen (DistributedSampler pads with repeats)."""
    order = index.argsort(stable=True)
    sorted_index = index[order]
    first = torch.ones_like(sorted_index, dtype=torch.bool)
    first[1:] = sorted_index[1:] != sorted_index[:-1]
    keep = order[first]
    return tuple(t[keep] for t in tensors)


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
        if not rows:
            return None, None
        feats, labels, index = (gather(torch.cat(column)) for column in zip(*rows))
        feats, labels = unique_by_index(index, feats, labels)
        labelled = labels >= 0
        return feats[labelled], labels[labelled]
