"""Spectral monitoring of the validation embeddings: RankMe, effective rank, alpha-ReQ, collapse.

One gathered, de-duplicated matrix per output key ("feats", "embeds"), one Gram product and two
symmetric eigen-solves per key (see :mod:`ssl_lightning.metrics.spectrum`).
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from ssl_lightning.datamodules.base import QUERIES
from ssl_lightning.distributed import gather
from ssl_lightning.metrics.knn import unique_by_index
from ssl_lightning.metrics.spectrum import (
    Spectrum,
    alpha_req_from_eigenvalues,
    effective_rank_from_eigenvalues,
    rankme_from_singular_values,
    spectrum,
)


class SpectrumCallback(L.Callback):
    """Logs RankMe, effective rank and alpha-ReQ of the validation embeddings; warns on collapse.

    At the end of every ``every_n_epochs``-th validation epoch (never in the sanity check), the
    outputs ``keys`` of ``validation_step`` on the validation set (dataloader_idx 0; the kNN bank
    is ignored) are gathered across ranks, de-duplicated by ``index`` and cut to ``max_samples``
    rows (the lowest dataset indices among those collected; each rank collects at most
    ``max_samples``). For every key it logs:

    * ``rankme/<key>``: RankMe (Garrido et al. 2023) of the raw matrix; ``rankme/<key>_ratio``:
      RankMe / embedding width;
    * ``erank/<key>``: effective rank of the covariance of the centred embeddings;
    * ``alpha_req/<key>`` and ``alpha_req/<key>_r2``: decay exponent of the covariance spectrum
      (positive = decaying) and the R² of its log-log fit over ``alpha_fit_range``;
    * ``rankme/num_samples``: the number of rows the measures were computed on.

    Cost per key: O(N·D·min(N, D)) for the Gram product plus two O(min(N, D)³) eigen-solves, in
    float64: 9.8 s for 25,600 x 2,048 on 2 shared CPU cores (``torch.linalg.svdvals``: 31.6 s); see
    ``benchmarks/monitoring_cost.py`` and docs/monitoring.md.

    Collapse: when ``rankme/<collapse_key>_ratio`` is below ``collapse_ratio`` for
    ``collapse_patience`` consecutive monitored validations, a warning names the method, the metric
    and the epoch; with ``stop_training=True`` the trainer stops (the decision is reduced across
    ranks so that all of them stop together). ``collapse_key=None`` disables the check.
    """

    def __init__(
        self,
        keys: tuple[str, ...] = ("feats", "embeds"),
        max_samples: int = 25_600,
        every_n_epochs: int = 1,
        alpha_fit_range: tuple[int, int | None] = (1, None),
        collapse_key: str | None = "embeds",
        collapse_ratio: float = 0.05,
        collapse_patience: int = 3,
        stop_training: bool = False,
    ):
        if collapse_key is not None and collapse_key not in keys:
            raise ValueError(f"SpectrumCallback: collapse_key={collapse_key!r} must be one of keys={keys}.")
        if max_samples < 2 or every_n_epochs < 1 or collapse_patience < 1:
            raise ValueError(
                "SpectrumCallback: max_samples must be >= 2, every_n_epochs and collapse_patience >= 1; "
                f"got {max_samples}, {every_n_epochs}, {collapse_patience}."
            )
        self.keys = tuple(keys)
        self.max_samples = max_samples
        self.every_n_epochs = every_n_epochs
        self.alpha_fit_range = tuple(alpha_fit_range)
        self.collapse_key = collapse_key
        self.collapse_ratio = collapse_ratio
        self.collapse_patience = collapse_patience
        self.stop_training = stop_training
        self.low_rank_streak = 0
        self._rows: list[dict[str, torch.Tensor]] = []
        self._collected = 0

    def _active(self, trainer: L.Trainer) -> bool:
        return not trainer.sanity_checking and (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._rows, self._collected = [], 0

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if dataloader_idx != QUERIES or not self._active(trainer) or self._collected >= self.max_samples:
            return
        missing = [key for key in (*self.keys, "index") if key not in outputs]
        if missing:
            raise KeyError(
                f"SpectrumCallback(keys={self.keys}): validation_step returned {sorted(outputs)}, "
                f"without {missing}. Return them (SSLMethod does) or change keys."
            )
        keep = self.max_samples - self._collected
        self._rows.append({key: outputs[key].detach()[:keep] for key in (*self.keys, "index")})
        self._collected += len(self._rows[-1]["index"])

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._active(trainer):
            return
        rows, self._rows = self._rows, []
        if not rows:
            rank_zero_warn("SpectrumCallback: no validation batches were seen; spectral metrics not logged.")
            return
        matrices = self._gather(rows)
        metrics = {"rankme/num_samples": float(len(next(iter(matrices.values()))))}
        for key, matrix in matrices.items():
            if not torch.isfinite(matrix).all():
                # A diverged model should not be stopped by its monitor: log NaN and say why.
                rank_zero_warn(f"SpectrumCallback: '{key}' holds NaN or inf values; its spectral metrics are NaN.")
                metrics.update(dict.fromkeys(self.measures_names(key), float("nan")))
                continue
            metrics.update(self.measures(key, spectrum(matrix.flatten(1))))
        for name, value in metrics.items():
            # Every rank holds the same gathered matrix, hence the same value: no sync needed.
            pl_module.log(name, value, add_dataloader_idx=False)
        if self.collapse_key is not None:
            width = matrices[self.collapse_key].flatten(1).shape[1]
            self._check_collapse(trainer, pl_module, metrics[f"rankme/{self.collapse_key}_ratio"], width)

    def measures(self, key: str, result: Spectrum) -> dict[str, float]:
        """The logged metrics of one key's spectrum."""
        rank = rankme_from_singular_values(result.singular_values)
        alpha, r2 = alpha_req_from_eigenvalues(result.covariance_eigenvalues, self.alpha_fit_range)
        erank = effective_rank_from_eigenvalues(result.covariance_eigenvalues)
        return dict(zip(self.measures_names(key), (rank, rank / result.dim, erank, alpha, r2)))

    @staticmethod
    def measures_names(key: str) -> tuple[str, ...]:
        """Names of the metrics logged for one key, in the order :meth:`measures` computes them."""
        return (f"rankme/{key}", f"rankme/{key}_ratio", f"erank/{key}", f"alpha_req/{key}", f"alpha_req/{key}_r2")

    def _gather(self, rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        index = gather(torch.cat([row["index"] for row in rows]))
        columns = [gather(torch.cat([row[key] for row in rows])) for key in self.keys]
        unique = unique_by_index(index, *columns)
        return {key: column[: self.max_samples] for key, column in zip(self.keys, unique)}

    def _check_collapse(self, trainer: L.Trainer, pl_module: L.LightningModule, ratio: float, width: int) -> None:
        name = f"rankme/{self.collapse_key}_ratio"
        self.low_rank_streak = self.low_rank_streak + 1 if ratio < self.collapse_ratio else 0
        collapsed = self.low_rank_streak >= self.collapse_patience
        if self.low_rank_streak == self.collapse_patience:
            rank_zero_warn(
                f"{type(pl_module).__name__}: {name} = {ratio:.4f} (RankMe / {width} of "
                f"'{self.collapse_key}') has been below {self.collapse_ratio} for {self.low_rank_streak} "
                f"consecutive validations at epoch {trainer.current_epoch}: the representation is collapsing. "
                "Check the learning rate, augmentations and loss weights"
                + ("; stopping training." if self.stop_training else " (stop_training=True stops the run).")
            )
        if self.stop_training and trainer.strategy.reduce_boolean_decision(collapsed, all=False):
            trainer.should_stop = True

    def state_dict(self) -> dict:
        return {"low_rank_streak": self.low_rank_streak}

    def load_state_dict(self, state_dict: dict) -> None:
        self.low_rank_streak = state_dict["low_rank_streak"]
