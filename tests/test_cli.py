import subprocess
import sys
from pathlib import Path

import pytest
from lightning.pytorch.cli import LightningCLI

from ssl_lightning.cli import SSLCLI, main
from ssl_lightning.methods import EVALUATIONS, METHODS

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
QUICKSTART = CONFIGS / "quickstart.yaml"
ALL_CONFIGS = sorted(CONFIGS.rglob("*.yaml"))


def instantiate(*args: str) -> LightningCLI:
    return SSLCLI(args=list(args), run=False)


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_config_instantiates(config):
    # Partial configs (logger/, strategy/, predict/, eval/) are layered on top of the quickstart recipe.
    layers = [QUICKSTART, config] if config.parent != CONFIGS and config.parent.name not in ("cifar10",) else [config]
    args = [arg for layer in layers for arg in ("--config", str(layer))]
    if config.parent.name == "eval":  # evaluations need a checkpoint, read only when the run starts
        args += ["--model.pretrained", "method.ckpt"]
    cli = instantiate(*args)
    assert type(cli.model).__name__ in {**METHODS, **EVALUATIONS}
    assert cli.model.hparams.batch_size == cli.datamodule.batch_size  # linked from the DataModule
    assert cli.model.hparams.in_chans == cli.datamodule.in_chans


def test_short_names_and_links():
    cli = instantiate("--model", "BarlowTwins", "--data", "Digits", "--data.batch_size", "64")
    assert type(cli.model).__name__ == "BarlowTwins"
    assert cli.model.hparams.batch_size == 64 and cli.model.hparams.in_chans == 1
    assert cli.model.hparams.num_classes == 10


def test_class_path_works_too():
    cli = instantiate("--model", "ssl_lightning.methods.BYOL", "--data", "ssl_lightning.datamodules.Digits")
    assert type(cli.model).__name__ == "BYOL"


def test_optimizer_is_a_method_argument_not_a_cli_key(capsys):
    with pytest.raises(SystemExit):
        instantiate("--config", str(QUICKSTART), "--optimizer", "Adam")
    assert "optimizer" in capsys.readouterr().err


def test_unknown_method_name_lists_valid_names(capsys):
    with pytest.raises(SystemExit):
        instantiate("--model", "SimCRL", "--data", "Digits")
    err = capsys.readouterr().err
    assert "SimCRL" in err and "Valid short names" in err
    assert all(name in err for name in METHODS) and "Digits" in err


def test_unknown_config_key_is_named(capsys):
    with pytest.raises(SystemExit):
        instantiate("--config", str(QUICKSTART), "--model.init_args.temprature", "0.5")
    assert "temprature" in capsys.readouterr().err


def test_list_prints_methods_datamodules_and_presets(capsys):
    main(["list"])
    out = capsys.readouterr().out
    for name in ("SimCLR", "BarlowTwins", "BYOL", "Digits", "CIFAR10", "ImageFolder", "simclr", "byol", "dino", "none"):
        assert name in out


def test_model_help_shows_defaults():
    result = subprocess.run(
        [sys.executable, "-m", "ssl_lightning", "fit", "--model.help", "BarlowTwins"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "lambda_offdiag" in result.stdout and "0.005" in result.stdout


def test_print_config_resolves_the_quickstart(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(QUICKSTART), "--print_config"])
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    assert "class_path: ssl_lightning.methods.SimCLR" in out and "temperature: 0.2" in out

