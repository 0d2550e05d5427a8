"""Checkpoints, configs and imports from before the method-families layout still work (with a
FutureWarning that names the new place). The fixtures were written by the code of that time
(tests/fixtures/before_families/README.md)."""

import importlib
import warnings

import lightning as L
import pytest
import torch

from ssl_lightning import load_backbone
from ssl_lightning.cli import SSLCLI, main
from ssl_lightning.evaluation import LinearProbe
from ssl_lightning.methods import BYOL, SimCLR

from helpers.paths import FIXTURES

BEFORE = FIXTURES / "before_families"
OLD_CHECKPOINT = BEFORE / "byol.ckpt"


def saved_state() -> dict[str, torch.Tensor]:
    return torch.load(OLD_CHECKPOINT, weights_only=True)["state_dict"]


def test_a_checkpoint_from_before_loads_by_class_and_by_its_recorded_class_path():
    for loaded in (BYOL.load_from_checkpoint(OLD_CHECKPOINT, weights_only=True),
                   L.LightningModule.load_from_checkpoint(OLD_CHECKPOINT, weights_only=True)):  # _class_path
        assert type(loaded) is BYOL
        state = loaded.state_dict()
        for key, value in saved_state().items():  # the teacher and the probe included
            assert torch.equal(state[key], value), key
    backbone = load_backbone(OLD_CHECKPOINT)
    assert torch.equal(backbone.conv1.weight, saved_state()["backbone.conv1.weight"])


def test_a_run_from_before_resumes_under_its_saved_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(BEFORE / "byol_config.yaml"), "--ckpt_path", str(OLD_CHECKPOINT),
          "--root", str(tmp_path / "runs"), "--trainer.max_steps", "3", "--trainer.enable_progress_bar", "false"])
    resumed = torch.load(tmp_path / "runs" / "legacy_byol" / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 3  # two steps before, one after the resume


def test_an_evaluation_config_from_before_names_the_moved_class_and_still_runs(tmp_path):
    with pytest.warns(FutureWarning, match="ssl_lightning.methods.LinearProbe moved to ssl_lightning.evaluation.LinearProbe"):
        cli = main(["fit", "--config", str(BEFORE / "linear_probe_config.yaml"),
                    "--model.init_args.pretrained", str(OLD_CHECKPOINT), "--trainer.default_root_dir", str(tmp_path),
                    "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.enable_progress_bar",
                    "false"])
    assert type(cli.model) is LinearProbe
    assert (tmp_path / "linear_top1.json").exists()


@pytest.mark.parametrize("old,new,name", [
    ("ssl_lightning.methods.simclr", "ssl_lightning.methods.ssl.simclr", "SimCLR"),
    ("ssl_lightning.methods.teacher", "ssl_lightning.components.teacher", "EMATeacher"),
    ("ssl_lightning.methods.optimization", "ssl_lightning.core.step_logging", "logger_writes_this_step"),
    ("ssl_lightning.heads", "ssl_lightning.components.heads", "MLPHead"),
])
def test_old_module_paths_import_the_new_objects_with_a_warning(old, new, name):
    with pytest.warns(FutureWarning, match=f"{old} moved to"):
        module = importlib.import_module(old)
    assert getattr(module, name) is getattr(importlib.import_module(new), name)


def test_an_old_module_whose_name_changed_meaning_fails_naming_the_new_places():
    with pytest.raises(ModuleNotFoundError, match="SpectrumCallback is in ssl_lightning.callbacks"):
        importlib.import_module("ssl_lightning.callbacks.rankme")


def test_a_config_naming_an_old_module_path_instantiates_the_new_class():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # imported once already by the test above, or not
        cli = SSLCLI(args=["--model", "ssl_lightning.methods.simclr.SimCLR", "--data", "Digits"], run=False)
    assert type(cli.model) is SimCLR


def test_moved_package_names_warn_and_resolve():
    from ssl_lightning import callbacks, metrics

    with pytest.warns(FutureWarning, match="ssl_lightning.callbacks.rankme moved to ssl_lightning.metrics.rankme"):
        assert callbacks.rankme is metrics.rankme
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        callbacks.no_such_name
