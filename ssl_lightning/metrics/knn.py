"""Weighted k-nearest-neighbour classification of embeddings, and de-duplication of gathered rows.

Protocol (Wu et al. 2018, as used by DINO and solo-learn): cosine similarity between
L2-normalised embeddings; each of the k nearest bank samples votes for its label with weight
``exp(similarity / temperature)``; the class with the largest summed vote is the prediction.
Pure functions of tensors, used by ``callbacks.KNNCallback``, ``callbacks.KNNReport`` and
``evaluation.KNNEvaluation``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import multiclass_accuracy

from ssl_lightning.distributed import gather


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


def gather_labelled_rows(rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(feats, labels, index)`` batches of every rank, gathered, each dataset index once, labelled
    rows only: the bank or the queries of a kNN evaluation. Every rank calls it and gets the same."""
    feats, labels, index = (gather(torch.cat(column)) for column in zip(*rows))
    feats, labels = unique_by_index(index, feats, labels)
    labelled = labels >= 0
    return feats[labelled], labels[labelled]
