"""Callbacks: monitoring of representation quality, throughput, run safety and prediction output."""

from ssl_lightning import _moved
from ssl_lightning.callbacks.embedding_writer import EmbeddingWriter
from ssl_lightning.callbacks.knn import KNNCallback
from ssl_lightning.callbacks.knn_report import KNNReport
from ssl_lightning.callbacks.plots import EmbeddingPlotCallback
from ssl_lightning.callbacks.preemption import SaveOnInterrupt
from ssl_lightning.callbacks.progress import ProgressLines, ThrottledProgressBar
from ssl_lightning.callbacks.random_states import RandomStates
from ssl_lightning.callbacks.spectrum import SpectrumCallback
from ssl_lightning.callbacks.throughput import ImagesPerSecond, InputWait

__all__ = [
    "EmbeddingPlotCallback",
    "EmbeddingWriter",
    "ImagesPerSecond",
    "InputWait",
    "KNNCallback",
    "KNNReport",
    "ProgressLines",
    "RandomStates",
    "SaveOnInterrupt",
    "SpectrumCallback",
    "ThrottledProgressBar",
]


def __getattr__(name: str):
    return _moved.moved_attribute(__name__, name)  # knn_accuracy, rankme, ...: now in ssl_lightning.metrics
