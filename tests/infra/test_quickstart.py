
from ssl_lightning.callbacks import KNNReport
from ssl_lightning.cli import main

from helpers.paths import CONFIGS

QUICKSTART = CONFIGS / "quickstart.yaml"


def test_quickstart_runs_end_to_end_for_one_short_epoch(tmp_path, caplog):
    caplog.set_level("INFO")
    cli = main([
        "fit", "--config", str(QUICKSTART), "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
        "--trainer.default_root_dir", str(tmp_path),
        "--trainer.log_every_n_steps", "2",  # the probe's training metrics are logged on logger steps only
    ])
    metrics = cli.trainer.callback_metrics
    assert {"train/loss", "train/probe_loss", "val/probe_top1", "val/knn_top1", "val/knn_top5"} <= set(metrics)
    assert list(tmp_path.rglob("*.ckpt")), "the run saves a checkpoint"
    report = next(cb for cb in cli.trainer.callbacks if isinstance(cb, KNNReport))
    assert set(report.results) == {"trained backbone", "random init (seed 0)", "raw pixels"}
    assert report.results["raw pixels"] > 90.0  # digits are easy for raw pixels: the protocol is sane
    assert "kNN top-1 (k=20" in caplog.text and "random init (seed 0)" in caplog.text
