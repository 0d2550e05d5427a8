"""Pictures of the validation embeddings: singular-value spectrum and a 2-D map coloured by label."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from ssl_lightning.datamodules.base import QUERIES
from ssl_lightning.distributed import gather
from ssl_lightning.metrics.knn import unique_by_index
from ssl_lightning.metrics.spectrum import singular_values


def has_umap() -> bool:
    return importlib.util.find_spec("umap") is not None


def project_2d(x: torch.Tensor, method: Literal["auto", "pca", "umap"] = "auto", seed: int = 0) -> torch.Tensor:
    """``[N, 2]`` coordinates: UMAP when requested (or "auto" with umap-learn installed), else PCA."""
    if method == "umap" or (method == "auto" and has_umap()):
        import umap  # optional dependency (umap-learn)

        return torch.from_numpy(umap.UMAP(n_components=2, random_state=seed).fit_transform(x.float().numpy()))
    centred = x.double() - x.double().mean(0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    return (centred @ v[:2].T).float()


def spectrum_figure(sigma: torch.Tensor, title: str):
    from matplotlib.figure import (
        Figure,  # no pyplot: no global backend state, works headless
    )

    figure = Figure(figsize=(5, 3.5), dpi=100)
    axes = figure.add_subplot()
    axes.semilogy(range(1, len(sigma) + 1), sigma.clamp_min(1e-12).tolist())
    axes.set(xlabel="index k", ylabel="singular value σ_k", title=title)
    figure.tight_layout()
    return figure


def map_figure(points: torch.Tensor, labels: torch.Tensor, title: str):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5, 5), dpi=100)
    axes = figure.add_subplot()
    scatter = axes.scatter(points[:, 0].tolist(), points[:, 1].tolist(), c=labels.tolist(), cmap="tab10", s=4)
    if (labels >= 0).any():
        figure.colorbar(scatter, ax=axes, label="label")
    axes.set(title=title, xticks=[], yticks=[])
    figure.tight_layout()
    return figure


class EmbeddingPlotCallback(L.Callback):
    """Every ``every_n_epochs`` epochs, plots the validation embeddings of ``key``.

    Two PNGs per plotted epoch in ``<run dir>/plots/`` (``trainer.log_dir``, else
    ``default_root_dir``): ``spectrum_<key>_epoch<E>.png`` (singular values of the raw matrix, log
    scale) and ``map_<key>_epoch<E>.png`` (PCA, or UMAP when umap-learn is installed, coloured by
    label). They are also sent to the loggers: ``experiment.add_figure`` for TensorBoard,
    ``log_image(key=..., images=[path], step=...)`` for W&B and any logger with that method.
    Embeddings are gathered across ranks (all ranks take part); only rank zero draws.
    """

    def __init__(
        self,
        key: str = "embeds",
        every_n_epochs: int = 10,
        max_samples: int = 5_000,
        projection: Literal["auto", "pca", "umap"] = "auto",
    ):
        if importlib.util.find_spec("matplotlib") is None:
            raise ImportError("EmbeddingPlotCallback needs matplotlib: pip install matplotlib")
        if projection == "umap" and not has_umap():
            raise ImportError("EmbeddingPlotCallback(projection='umap') needs umap-learn: pip install umap-learn")
        if every_n_epochs < 1 or max_samples < 2:
            raise ValueError(f"every_n_epochs must be >= 1 and max_samples >= 2, got {every_n_epochs}, {max_samples}.")
        self.key = key
        self.every_n_epochs = every_n_epochs
        self.max_samples = max_samples
        self.projection = projection
        self._rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def _active(self, trainer: L.Trainer) -> bool:
        return not trainer.sanity_checking and (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._rows = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if dataloader_idx != QUERIES or not self._active(trainer):
            return
        if self.key not in outputs or "index" not in outputs:
            raise KeyError(f"EmbeddingPlotCallback(key={self.key!r}): validation_step returned {sorted(outputs)}.")
        embeddings = outputs[self.key].detach()
        labels = outputs.get("label", torch.full((len(embeddings),), -1, device=embeddings.device))
        self._rows.append((embeddings, labels.detach(), outputs["index"].detach()))

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._active(trainer) or not self._rows:
            return
        embeddings, labels, index = (gather(torch.cat(column)) for column in zip(*self._rows))
        self._rows = []
        if trainer.global_rank != 0:
            return
        embeddings, labels = unique_by_index(index, embeddings.flatten(1), labels)
        embeddings, labels = embeddings[: self.max_samples].cpu(), labels[: self.max_samples].cpu()
        epoch = trainer.current_epoch
        sigma, points = singular_values(embeddings), project_2d(embeddings, self.projection)
        figures = {
            f"spectrum_{self.key}": spectrum_figure(sigma, f"{self.key}: spectrum, epoch {epoch}"),
            f"map_{self.key}": map_figure(points, labels, f"{self.key}, epoch {epoch}"),
        }
        directory = Path(trainer.log_dir or trainer.default_root_dir) / "plots"
        directory.mkdir(parents=True, exist_ok=True)
        for name, figure in figures.items():
            path = directory / f"{name}_epoch{epoch:04d}.png"
            figure.savefig(path)
            self._send(trainer, f"plots/{name}", figure, path)

    @staticmethod
    def _send(trainer: L.Trainer, tag: str, figure, path: Path) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure(tag, figure, global_step=trainer.global_step)
            elif callable(getattr(logger, "log_image", None)):
                logger.log_image(key=tag, images=[str(path)], step=trainer.global_step)
