"""Representation and classification measures as pure functions of tensors, shared by callbacks
and evaluations: kNN accuracy, spectra (RankMe, effective rank, alpha-ReQ), top-k hits."""

from ssl_lightning.metrics.accuracy import labelled_top_k_hits
from ssl_lightning.metrics.knn import knn_accuracy, knn_scores, unique_by_index
from ssl_lightning.metrics.spectrum import (
    alpha_req,
    effective_rank,
    rankme,
    singular_values,
)

__all__ = [
    "alpha_req",
    "effective_rank",
    "knn_accuracy",
    "knn_scores",
    "labelled_top_k_hits",
    "rankme",
    "singular_values",
    "unique_by_index",
]
