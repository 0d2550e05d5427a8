import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.strategies import FSDPStrategy
from torch.distributed.fsdp import ShardingStrategy

from ssl_lightning.cli import SSLCLI, join_negative_values, main
from ssl_lightning.evaluation import EVALUATIONS
from ssl_lightning.methods import METHODS
from ssl_lightning.strategies import wrap_blocks_backbone_and_heads

from helpers.fakes import tiny_fit_args
from helpers.paths import CONFIGS

QUICKSTART = CONFIGS / "quickstart.yaml"
ALL_CONFIGS = sorted(CONFIGS.rglob("*.yaml"))
PARTIAL_CONFIG_FOLDERS = ("eval", "predict", "logger", "strategy")


def instantiate(*args: str, cli_class: type[SSLCLI] = SSLCLI) -> LightningCLI:
    return cli_class(args=list(args), run=False)


class SSLCLIWithoutTrainer(SSLCLI):
    """Instantiates everything a config names (the strategy included) except the Trainer, which
    Lightning refuses to build for a GPU-only config (FSDP) on a machine without CUDA."""

    def instantiate_trainer(self, **kwargs):
        return None


def cli_class_for(config: Path) -> type[SSLCLI]:
    needs_gpu = (yaml.safe_load(config.read_text()).get("trainer") or {}).get("accelerator") == "gpu"
    return SSLCLIWithoutTrainer if needs_gpu and not torch.cuda.is_available() else SSLCLI


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_config_instantiates(config):
    # Partial configs (logger/, strategy/, predict/, eval/) are layered on top of the quickstart recipe;
    # the others are whole recipes (quickstart.yaml, one folder per dataset).
    layers = [QUICKSTART, config] if config.parent.name in PARTIAL_CONFIG_FOLDERS else [config]
    args = [arg for layer in layers for arg in ("--config", str(layer))]
    if config.parent.name == "eval":  # evaluations need a checkpoint, read only when the run starts
        args += ["--model.pretrained", "method.ckpt"]
    cli = instantiate(*args, cli_class=cli_class_for(config))
    assert type(cli.model).__name__ in {**METHODS, **EVALUATIONS}
    assert cli.model.hparams.batch_size == cli.datamodule.batch_size  # linked from the DataModule
    assert cli.model.hparams.in_chans == cli.datamodule.in_chans


def test_fsdp_config_wraps_blocks_in_bf16_with_full_checkpoints():
    fsdp = CONFIGS / "strategy" / "fsdp.yaml"
    cli = instantiate("--config", str(QUICKSTART), "--config", str(fsdp), cli_class=cli_class_for(fsdp))
    trainer = cli.config_init["trainer"]
    assert trainer.accelerator == "gpu" and trainer.precision == "bf16-mixed"
    strategy = trainer.strategy
    assert isinstance(strategy, FSDPStrategy) and strategy.sharding_strategy == ShardingStrategy.FULL_SHARD
    assert strategy.kwargs == {"auto_wrap_policy": wrap_blocks_backbone_and_heads, "use_orig_params": True}
    assert cli.config.trainer.strategy.init_args.state_dict_type == "full"


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


def test_misspelled_argument_is_named_with_the_nearest_valid_ones(capsys):
    with pytest.raises(SystemExit):
        instantiate("--config", str(QUICKSTART), "--model.init_args.temprature", "0.5")
    err = capsys.readouterr().err
    assert "SimCLR takes no argument 'temprature'. Did you mean 'temperature'?" in err
    assert "unknown class name" not in err  # SimCLR is known: no list of class names


def test_config_file_that_is_not_yaml_is_named_with_its_line(tmp_path, capsys):
    config = tmp_path / "broken.yaml"
    config.write_text("model:\n  class_path: SimCLR\n  init_args: {lr: 0.1\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"config file {config} is not valid YAML" in err and f'"{config}", line 3' in err


def test_negative_number_after_a_space_is_a_value(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(QUICKSTART), "--model.init_args.weight_decay", "-1e-4", "--print_config"])
    assert "weight_decay: -0.0001" in capsys.readouterr().out
    assert join_negative_values(["--a", "-.5", "--b", "-inf", "--c=1", "-2", "-c", "-3"]) == [
        "--a=-.5", "--b=-inf", "--c=1", "-2", "-c", "-3"]  # only after a long option without a value


def test_data_error_while_linking_is_one_plain_line(tmp_path, capsys):
    missing = tmp_path / "missing"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--model", "SimCLR", "--data", "ImageFolder", "--data.train_dir", str(missing)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"error: ImageFolder (num_classes): image folder not found: {missing}" in err
    assert "compute_fn" not in err and "Traceback" not in err


def test_list_prints_methods_datamodules_and_presets(capsys):
    main(["list"])
    out = capsys.readouterr().out
    names = ("SimCLR", "BarlowTwins", "BYOL", "LinearProbe", "KNNEvaluation", "FineTune", "Digits", "CIFAR10",
             "ImageFolder", "simclr", "byol", "dino", "supervised", "none")
    for name in names:
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



class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_bar_on_a_terminal_lines_in_a_log_unless_configured(monkeypatch):
    def bars(*args):
        trainer = instantiate("--config", str(QUICKSTART), *args).trainer
        return [type(cb).__name__ for cb in trainer.callbacks if isinstance(cb, ProgressBar)]

    assert bars() == ["ProgressLines"]  # pytest's captured stderr is not a terminal
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert bars() == ["ThrottledProgressBar"]
    assert bars("--trainer.enable_progress_bar", "false") == []
    own = '[{"class_path": "lightning.pytorch.callbacks.TQDMProgressBar", "init_args": {"refresh_rate": 10}}]'
    assert bars("--trainer.callbacks", own) == ["TQDMProgressBar"]


@pytest.mark.timeout(180)
def test_fit_into_a_log_file_writes_whole_progress_lines(tmp_path):
    """Standard error piped, as in a SLURM log: one line per epoch, no bar redrawn with carriage returns."""
    args = [*tiny_fit_args("logged", 2), "--trainer.enable_progress_bar", "true"]
    result = subprocess.run([sys.executable, "-m", "ssl_lightning", *args], cwd=tmp_path, capture_output=True,
                            text=True, timeout=150, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "\r" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("Epoch ")]
    assert [line.split(" | ")[:2] for line in lines] == [["Epoch 0/1 end", "step 3"], ["Epoch 1/1 end", "step 6"]]
    assert all("train/loss=" in line for line in lines)


def test_every_run_saves_on_interrupt_keeps_rng_states_and_logs_throughput_and_input_wait():
    trainer = instantiate("--config", str(QUICKSTART), "--trainer.callbacks", "[]").trainer
    names = {type(callback).__name__ for callback in trainer.callbacks}
    assert {"SaveOnInterrupt", "RandomStates", "ImagesPerSecond", "InputWait"} <= names
