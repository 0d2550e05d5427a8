"""Callbacks that watch representation quality."""

from ssl_lightning.callbacks.embedding_writer import EmbeddingWriter
from ssl_lightning.callbacks.knn import KNNCallback, knn_accuracy, knn_scores
from ssl_lightning.callbacks.knn_report import KNNReport
from ssl_lightning.callbacks.preemption import SaveOnInterrupt
from ssl_lightning.callbacks.progress import ThrottledProgressBar
from ssl_lightning.callbacks.plots import EmbeddingPlotCallback
from ssl_lightning.callbacks.random_states import RandomStates
from ssl_lightning.callbacks.rankme import SpectrumCallback
from ssl_lightning.callbacks.spectrum import alpha_req, effective_rank, rankme, singular_values
from ssl_lightning.callbacks.throughput import ImagesPerSecond, InputWait

__all__ = [
    "EmbeddingPlotCallback",
    "EmbeddingWriter",
    "ImagesPerSecond",
    "InputWait",
    "KNNCallback",
    "KNNReport",
    "RandomStates",
    "SaveOnInterrupt",
    "SpectrumCallback",
    "ThrottledProgressBar",
    "alpha_req",
    "effective_rank",
    "knn_accuracy",
    "knn_scores",
    "rankme",
    "singular_values",
]
