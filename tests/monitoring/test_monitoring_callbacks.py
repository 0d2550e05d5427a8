"""The monitoring callbacks inside real fits: single process, two-process ddp_spawn, collapse."""

import csv
import math
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger

from ssl_lightning.callbacks import EmbeddingPlotCallback, KNNCallback, SpectrumCallback
from ssl_lightning.datamodules import Digits
from ssl_lightning.methods import BYOL, SimCLR
from ssl_lightning.metrics import rankme

from helpers.fakes import TINY_BACKBONE
from helpers.monitoring_stubs import FixedEmbeddings, StubMethod

DIGITS_VAL_SIZE = 360  # 20 % of scikit-learn's 1,797 digits, rounded up by the stratified split
SPECTRAL = {f"{family}/{key}{suffix}" for key in ("feats", "embeds") for family, suffix in
            [("rankme", ""), ("rankme", "_ratio"), ("erank", ""), ("alpha_req", ""), ("alpha_req", "_r2")]}


def quick_trainer(**kwargs) -> L.Trainer:
    defaults = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, max_epochs=1, limit_train_batches=2)
    return L.Trainer(**{**defaults, **kwargs})


@pytest.mark.parametrize("method", [SimCLR, BYOL])
def test_spectrum_runs_in_a_fit_on_the_whole_validation_set(method):
    model = method(**TINY_BACKBONE, proj_hidden_dim=32, proj_dim=16, warmup_steps=0)
    trainer = quick_trainer(callbacks=[SpectrumCallback()], limit_train_batches=1)
    trainer.fit(model, Digits(batch_size=32, num_workers=0))
    metrics = trainer.callback_metrics
    assert SPECTRAL <= set(metrics)
    assert float(metrics["rankme/num_samples"]) == DIGITS_VAL_SIZE
    assert 1.0 <= float(metrics["rankme/embeds"]) <= 16.0
    assert float(metrics["rankme/embeds_ratio"]) == pytest.approx(float(metrics["rankme/embeds"]) / 16)


def logged_epochs(tmp_path, name: str) -> list[int]:
    with next(tmp_path.rglob("metrics.csv")).open() as f:
        return [int(row["epoch"]) for row in csv.DictReader(f) if row.get(name)]


def test_knn_every_n_epochs_skips_the_other_epochs(tmp_path):
    model = SimCLR(**TINY_BACKBONE, proj_hidden_dim=32, proj_dim=16, warmup_steps=0)
    trainer = quick_trainer(callbacks=[KNNCallback(k=20, every_n_epochs=2)], max_epochs=2, limit_train_batches=1,
                            limit_val_batches=2, logger=CSVLogger(tmp_path))
    trainer.fit(model, Digits(batch_size=32, num_workers=0))
    assert logged_epochs(tmp_path, "val/knn_top1") == [1]


@pytest.mark.ddp
@pytest.mark.timeout(180)
def test_spectrum_under_ddp_spawn_gathers_and_deduplicates(tmp_path):
    data = FixedEmbeddings(45)  # odd: DistributedSampler pads one rank with a repeated row
    trainer = quick_trainer(strategy="ddp_spawn", devices=2, callbacks=[SpectrumCallback()],
                            default_root_dir=tmp_path)
    trainer.fit(StubMethod(data))
    metrics = trainer.callback_metrics
    assert float(metrics["rankme/num_samples"]) == 45
    assert float(metrics["rankme/feats"]) == pytest.approx(rankme(data.rows), rel=1e-5)
    assert SPECTRAL <= set(metrics)


def test_spectrum_max_samples_and_every_n_epochs(tmp_path):
    callback = SpectrumCallback(max_samples=20, every_n_epochs=2)
    trainer = quick_trainer(callbacks=[callback], max_epochs=4, logger=CSVLogger(tmp_path))
    trainer.fit(StubMethod(FixedEmbeddings(40)))
    assert logged_epochs(tmp_path, "rankme/feats") == [1, 3]
    assert float(trainer.callback_metrics["rankme/num_samples"]) == 20
    assert float(trainer.callback_metrics["rankme/feats"]) == pytest.approx(rankme(FixedEmbeddings(40).rows[:20]))


def test_collapse_warns_naming_method_metric_and_epoch_and_stops():
    callback = SpectrumCallback(collapse_patience=2, stop_training=True)
    trainer = quick_trainer(callbacks=[callback], max_epochs=6)
    with pytest.warns(UserWarning, match=r"StubMethod: rankme/embeds_ratio = 0\.03.* at epoch 1: .*collapsing"):
        trainer.fit(StubMethod(FixedEmbeddings(40, collapsed=True)))
    assert trainer.current_epoch == 2  # stopped after the second collapsed validation, not at max_epochs


def test_no_collapse_warning_on_healthy_embeddings(recwarn):
    trainer = quick_trainer(callbacks=[SpectrumCallback(collapse_patience=1, stop_training=True)], max_epochs=2)
    trainer.fit(StubMethod(FixedEmbeddings(40)))
    assert trainer.current_epoch == 2
    assert not [w for w in recwarn if "collapsing" in str(w.message)]


def test_non_finite_embeddings_log_nan_instead_of_failing_the_fit():
    data = FixedEmbeddings(16)
    data.rows[3, 0] = float("nan")
    trainer = quick_trainer(callbacks=[SpectrumCallback()])
    with pytest.warns(UserWarning, match="'feats' holds NaN"):
        trainer.fit(StubMethod(data))
    assert math.isnan(float(trainer.callback_metrics["rankme/feats"]))


def test_missing_output_key_is_named():
    class NoEmbeds(StubMethod):
        def validation_step(self, batch, batch_idx):
            return {"feats": batch["x"], "index": batch["index"]}

    trainer = quick_trainer(callbacks=[SpectrumCallback()], num_sanity_val_steps=0)
    with pytest.raises(KeyError, match="without \\['embeds'\\]"):
        trainer.fit(NoEmbeds(FixedEmbeddings(16)))


class ImageRecorder(Logger):
    """A logger that accepts images, the way WandbLogger.log_image does."""

    def __init__(self):
        super().__init__()
        self.images = []

    name, version = "recorder", 0

    def log_metrics(self, metrics, step=None):
        pass

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_image(self, key, images, step=None):
        self.images.append((key, images, step))


def test_plots_write_pngs_and_reach_image_loggers(tmp_path):
    recorder = ImageRecorder()
    trainer = quick_trainer(callbacks=[EmbeddingPlotCallback(every_n_epochs=2, projection="pca")], max_epochs=2,
                            logger=[recorder], default_root_dir=tmp_path)
    trainer.fit(StubMethod(FixedEmbeddings(40)))
    pngs = sorted(path.name for path in tmp_path.rglob("*.png"))
    assert pngs == ["map_embeds_epoch0001.png", "spectrum_embeds_epoch0001.png"]
    assert [(key, step) for key, _, step in recorder.images] == [("plots/spectrum_embeds", 4), ("plots/map_embeds", 4)]
    assert all(Path(images[0]).is_file() for _, images, _ in recorder.images)


def test_plots_go_to_tensorboard_as_figures(monkeypatch):
    # tensorboard need not be installed: only the figure hand-over is under test.
    figures = []
    monkeypatch.setattr(TensorBoardLogger, "experiment", property(lambda self: FigureSink(figures)))
    trainer = SimpleNamespace(loggers=[object.__new__(TensorBoardLogger)], global_step=7)
    EmbeddingPlotCallback._send(trainer, "plots/map_embeds", "a figure", Path("unused.png"))
    assert figures == [("plots/map_embeds", "a figure", 7)]


class FigureSink:
    def __init__(self, figures):
        self.figures = figures

    def add_figure(self, tag, figure, global_step=None):
        self.figures.append((tag, figure, global_step))
