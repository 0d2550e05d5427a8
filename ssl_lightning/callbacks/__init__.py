"""Callbacks that watch representation quality."""

from ssl_lightning.callbacks.knn import KNNCallback, knn_accuracy, knn_scores
from ssl_lightning.callbacks.knn_report import KNNReport

__all__ = ["KNNCallback", "KNNReport", "knn_accuracy", "knn_scores"]
