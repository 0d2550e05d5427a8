import json

import pytest
import torch

from ssl_lightning.cli import main
from ssl_lightning.datamodules import Digits
from ssl_lightning.evaluation import LinearProbe

from helpers.fakes import quick_trainer
from helpers.paths import CONFIGS

RECIPE = ["--config", str(CONFIGS / "quickstart.yaml"), "--data.batch_size", "32"]


def test_linear_probe_cli_trains_on_cached_features_and_writes_results(method_checkpoint, tmp_path):
    main(["fit", *RECIPE, "--config", str(CONFIGS / "eval" / "linear.yaml"), "--model.pretrained", str(method_checkpoint),
          "--trainer.max_epochs", "2", "--model.lr", "5.0", "--trainer.default_root_dir", str(tmp_path),
          "--trainer.enable_progress_bar", "false"])
    record = json.loads((tmp_path / "linear_top1.json").read_text())
    assert record["dataset"] == "Digits" and record["split"] == "val" and record["epochs"] == 2
    assert record["checkpoint"] == str(method_checkpoint) and "no augmentation" in record["protocol"]
    # chance is 10%; the 2-step backbone gives tiny, weak features (sklearn logistic regression: 35%)
    assert record["value"] > 20
    lines = (tmp_path / "results.md").read_text().splitlines()
    assert lines[0].startswith("| dataset |") and len(lines) == 3 and "linear_top1" in lines[2]


def test_backbone_stays_frozen_in_eval_mode_without_the_cache(method_checkpoint):
    probe = LinearProbe(pretrained=str(method_checkpoint), feature_cache=False)
    trainer = quick_trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=2)
    datamodule = Digits(batch_size=32, num_workers=0)
    state = torch.load(method_checkpoint, weights_only=True)["state_dict"]
    trainer.fit(probe, datamodule)
    assert probe.hparams.num_classes == 10 and not probe.backbone.training
    for key, value in probe.backbone.state_dict().items():
        assert torch.equal(value, state[f"backbone.{key}"]), key  # weights and BatchNorm statistics
    assert "val/linear_top1" in trainer.callback_metrics


def test_knn_evaluation_cli_reports_k20_and_k200(method_checkpoint, tmp_path):
    main(["validate", *RECIPE, "--config", str(CONFIGS / "eval" / "knn.yaml"), "--model.pretrained", str(method_checkpoint),
          "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"])
    for k in (20, 200):
        record = json.loads((tmp_path / f"knn_top1_k{k}.json").read_text())
        assert record["metric"] == f"knn_top1_k{k}" and f"k={k}, T=0.1, cosine" in record["protocol"]
        assert 10 < record["value"] <= 100
    assert len((tmp_path / "results.md").read_text().splitlines()) == 4


def test_mismatched_channels_are_refused(method_checkpoint):
    probe = LinearProbe(pretrained=str(method_checkpoint), in_chans=3, num_classes=10)
    with pytest.raises(ValueError, match="takes 1-channel images but the DataModule yields 3-channel"):
        probe.configure_model()
