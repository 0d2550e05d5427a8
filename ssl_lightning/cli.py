"""``python -m ssl_lightning {fit,validate,test,predict,list,export} ...``: LightningCLI with short names."""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch.distributed as dist
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import (
    LightningArgumentParser,
    LightningCLI,
    SaveConfigCallback,
)
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from ssl_lightning import callbacks as callbacks_module
from ssl_lightning import datamodules as datamodules_module
from ssl_lightning.callbacks.preemption import SaveOnInterrupt
from ssl_lightning.callbacks.progress import ProgressLines, ThrottledProgressBar
from ssl_lightning.callbacks.random_states import RandomStates
from ssl_lightning.callbacks.throughput import ImagesPerSecond, InputWait
from ssl_lightning.checkpoint_io import AtomicCheckpointIO
from ssl_lightning.evaluation import EVALUATIONS
from ssl_lightning.export import export_command
from ssl_lightning.methods import FAMILIES, METHODS, TTAMethod
from ssl_lightning.run_lock import is_launch_rank_zero, lock_run, release_run_locks
from ssl_lightning.runs import (
    find_resume_checkpoint,
    load_wandb_run_id,
    run_dir,
    save_wandb_run_id,
    step_checkpoint,
)

DATA_LINKS = ("batch_size", "num_classes", "in_chans", "image_size")


def datamodule_classes() -> dict[str, type]:
    return {
        name: obj for name in datamodules_module.__all__
        if isinstance(obj := getattr(datamodules_module, name), type)
        and issubclass(obj, L.LightningDataModule) and obj is not datamodules_module.ViewDataModule
    }


class SSLArgumentParser(LightningArgumentParser):
    """Adds to jsonargparse's message the valid short names when a model or data class is unknown,
    and the nearest argument names when a known class is given one it does not take."""

    def error(self, message: str, *args, **kwargs):
        hint = _misspelled_argument_hint(message) or _unknown_name_hint(message)
        return super().error(message + hint if hint else message, *args, **kwargs)


def _unknown_name_hint(message: str) -> str:
    about_class = any(f'key "{key}"' in message for key in ("model", "data"))
    unresolved = ("import path", "not a subclass", "does not correspond to a subclass")
    # A known class with a missing required argument (LinearProbe's pretrained) is not an unknown name.
    if "arguments are required" in message or not (about_class and any(m in message.lower() for m in unresolved)):
        return ""
    return (
        "\n\nssl_lightning: unknown class name. Valid short names:\n"
        f"  model: {', '.join([*METHODS, *EVALUATIONS])}\n"
        f"  data:  {', '.join(datamodule_classes())}\n"
        "or give a full class path (e.g. my_package.MyMethod). `python -m ssl_lightning list` shows them all."
    )


def _misspelled_argument_hint(message: str) -> str:
    """For "Problem with given class_path 'X': Option 'y' is not accepted": X's arguments closest to y."""
    found = re.search(r"class_path '([\w.]+)':\s*Option '(\w+)' is not accepted", message)
    if found is None:
        return ""
    class_path, option = found.groups()
    try:
        cls = _import_class(class_path)
    except (ImportError, AttributeError):
        return ""
    close = difflib.get_close_matches(option, init_argument_names(cls), n=3)
    suggestion = f" Did you mean {' or '.join(repr(name) for name in close)}?" if close else ""
    group = "model" if issubclass(cls, L.LightningModule) else "data"
    return (f"\n\nssl_lightning: {cls.__name__} takes no argument {option!r}.{suggestion} "
            f"`python -m ssl_lightning fit --{group}.help {cls.__name__}` lists its arguments.")


def init_argument_names(cls: type) -> list[str]:
    """The keyword arguments a class takes, those its ``**kwargs`` pass to its bases included."""
    names: list[str] = []
    for klass in cls.__mro__:
        init = vars(klass).get("__init__")
        if init is None or klass.__module__.startswith(("lightning.", "torch.")):
            continue
        names += [name for name, parameter in inspect.signature(init).parameters.items()
                  if name != "self" and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)]
    return list(dict.fromkeys(names))


class SaveAndUploadConfig(SaveConfigCallback):
    """Saves ``config.yaml`` in the run directory (Lightning's behaviour) and also uploads the whole
    resolved config to W&B as the run's config, so a run can be reproduced from its page alone
    (the method's hyperparameters alone miss the data, trainer and callbacks)."""

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if isinstance(trainer.logger, WandbLogger):
            trainer.logger.experiment.config.update({"cli": self.config.as_dict()}, allow_val_change=True)
            if self.config.get("run_name") is not None:  # a rerun of the run continues this W&B run
                save_wandb_run_id(run_dir(self.config.root, self.config.run_name), trainer.logger.experiment.id)


class SSLCLI(LightningCLI):
    """LightningCLI with the optimizer as a method argument (``auto_configure_optimizers=False``)
    and the DataModule's batch size, classes, channels and image size linked into the method.

    Runs (docs/reliability.md): with ``run_name`` set, the run lives in ``<root>/<run_name>``,
    step checkpoints go to its ``checkpoints/`` folder, ``fit`` holds its ``run.lock`` (one fit per
    run at a time) and resumes from the loadable checkpoint with the highest step there when no
    ``ckpt_path`` is given. Every checkpoint is written
    atomically (:class:`AtomicCheckpointIO`), SIGTERM and Ctrl-C save one
    (:class:`SaveOnInterrupt`), checkpoints hold every process's RNG states (:class:`RandomStates`),
    and ``fit`` loads checkpoints with ``weights_only=True``.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("model_class", L.LightningModule)
        kwargs.setdefault("datamodule_class", L.LightningDataModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("save_config_callback", SaveAndUploadConfig)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(*args, parser_class=SSLArgumentParser, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for key in DATA_LINKS:
            parser.link_arguments(
                "data", f"model.init_args.{key}", compute_fn=_attribute_reader(key), apply_on="instantiate"
            )
        parser.add_argument(
            "--run_name", type=Optional[str], default=None,
            help="Name of the run: it lives in <root>/<run_name> (overriding trainer.default_root_dir), and "
            "rerunning `fit` with the same name resumes from its newest checkpoint.",
        )
        parser.add_argument("--root", type=str, default="runs", help="Folder that holds the runs.")
        parser.add_argument(
            "--checkpoint_every_n_steps", type=Optional[int], default=None,
            help="Save a step checkpoint every N optimizer steps (the last two and last.ckpt are kept); "
            "None: at the end of each epoch. Needs run_name.",
        )

    def before_instantiate_classes(self) -> None:
        config = self._subcommand_config()
        if config.get("run_name") is None:
            if config.get("checkpoint_every_n_steps") is not None:
                raise ValueError("checkpoint_every_n_steps needs run_name: name the run (--run_name NAME).")
            return
        run = run_dir(config.root, config.run_name)
        config.trainer.default_root_dir = str(run)
        if self.subcommand == "fit" and is_launch_rank_zero():  # one lock per launch, held until main() ends
            lock_run(run)
        if self.subcommand == "fit" and config.get("ckpt_path") is None:
            point = find_resume_checkpoint(run)
            if point is not None:
                config.ckpt_path = str(point.path)
                passed_over = f" Passed over: {'; '.join(point.passed_over)}." if point.passed_over else ""
                rank_zero_info(
                    f"Run '{config.run_name}': resuming from {point.path} (step {point.step}, epoch {point.epoch})."
                    + passed_over
                )
                continue_wandb_run(config.trainer.get("logger"), run)
        if self.subcommand == "fit" and config.get("weights_only") is None:
            config.weights_only = True

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        config = self._subcommand_config()
        trainer_config = self._get(self.config_init, "trainer", default={})
        plugins = _as_list(kwargs.get("plugins", trainer_config.get("plugins")))
        if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
            plugins.append(AtomicCheckpointIO())
        callbacks = _as_list(kwargs.get("callbacks", trainer_config.get("callbacks")))
        wants_checkpoints = trainer_config.get("enable_checkpointing") is not False
        if config.get("run_name") is not None and wants_checkpoints and not any(
            isinstance(callback, ModelCheckpoint) for callback in callbacks
        ):
            run = run_dir(config.root, config.run_name)
            callbacks.append(step_checkpoint(run, config.get("checkpoint_every_n_steps")))
        for always_on in (SaveOnInterrupt, RandomStates, ImagesPerSecond, InputWait):
            if not any(isinstance(callback, always_on) for callback in callbacks):
                callbacks.append(always_on())
        if trainer_config.get("enable_progress_bar") is not False and not any(
            isinstance(callback, ProgressBar) for callback in callbacks
        ):
            # A bar that redraws itself fills a file (a SLURM log, `> log.txt`) with carriage returns.
            callbacks.append(ThrottledProgressBar() if sys.stderr.isatty() else ProgressLines())
        if self.subcommand == "test" and isinstance(getattr(self, "model", None), TTAMethod):
            kwargs["inference_mode"] = False  # test-time adaptation takes gradients inside `test`
        return super().instantiate_trainer(**{**kwargs, "plugins": plugins, "callbacks": callbacks})

    def _subcommand_config(self):
        return self.config[self.subcommand] if self.subcommand else self.config


def continue_wandb_run(logger_config: Any, run: Path) -> None:
    """Points the config's W&B logger (one without an explicit ``id``) at the W&B run this run
    started, so the resumed metrics continue on the same W&B page (Lightning's WandbLogger
    initialises with ``resume="allow"``)."""
    run_id = load_wandb_run_id(run)
    if run_id is None:
        return
    for logger in _as_list(logger_config):
        class_path = logger.get("class_path") if hasattr(logger, "get") else None
        if class_path is None or not issubclass(_import_class(class_path), WandbLogger):
            continue
        if logger.init_args.get("id") is None and logger.init_args.get("version") is None:
            logger.init_args.id = run_id
            rank_zero_info(f"Run '{run.name}': continuing W&B run {run_id}.")


def _import_class(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


class DataSetupError(ValueError):
    """The DataModule could not answer what the method is linked to (its data is missing or
    malformed). The CLI prints its message alone, without jsonargparse's link traceback."""


def _attribute_reader(key: str):
    def read(datamodule):
        try:
            return getattr(datamodule, key, None)
        except (ValueError, OSError) as error:  # a bad path or malformed data, not a bug: say it plainly
            raise DataSetupError(f"{type(datamodule).__name__} ({key}): {error}") from error

    return read


def print_registry() -> None:
    lines = ["Methods (model: <name>), by family:"]
    for family, methods in FAMILIES.items():
        lines.append(f"  {family}:")
        lines += [f"    {name:<14} {_first_doc_line(cls)}" for name, cls in methods.items()]
    lines.append("Evaluations of a checkpoint (model: <name>, model.pretrained: <ckpt>):")
    lines += [f"  {name:<16} {_first_doc_line(cls)}" for name, cls in EVALUATIONS.items()]
    lines.append("DataModules (data: <name>):")
    lines += [f"  {name:<16} {_first_doc_line(cls)}" for name, cls in datamodule_classes().items()]
    lines.append("View presets (data.views: <name>):")
    lines += [f"  {name}" for name in datamodules_module.VIEW_PRESETS]
    lines.append("Callbacks (trainer.callbacks):")
    lines += [f"  {name:<16} {_first_doc_line(getattr(callbacks_module, name))}"
              for name in callbacks_module.__all__ if isinstance(getattr(callbacks_module, name), type)]
    sys.stdout.write("\n".join(lines) + "\n")


def _first_doc_line(obj) -> str:
    return (obj.__doc__ or "").strip().splitlines()[0] if obj.__doc__ else ""


@contextmanager
def subcommand_teardown() -> Iterator[None]:
    """Releases what a subcommand holds past its end: the run lock (always), and, when it ended
    cleanly, the process group a torchrun or srun launch set up.

    Lightning leaves the process group alive after ``fit``; its gloo threads then meet the
    interpreter's shutdown, which now and then aborts a finished run ("terminate called without an
    active exception", exit -6). After a failure the group is left alone: destroying it while other
    ranks may still be in a collective can hang.
    """
    clean = False
    try:
        yield
        clean = True
    except SystemExit as exit_:  # Lightning's graceful SIGTERM exit has no code
        clean = exit_.code in (None, 0)
        raise
    finally:
        release_run_locks()
        if clean and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


_NEGATIVE_NUMBER = re.compile(r"-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?|-inf", re.IGNORECASE)


def split_passthrough(argv: list[str]) -> tuple[list[str], list[str]]:
    """A driver's own arguments and those after ``--``, which it passes to every run it starts."""
    if "--" not in argv:
        return list(argv), []
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1:]


def join_negative_values(argv: list[str]) -> list[str]:
    """``--key -1e-3`` as ``--key=-1e-3``: argparse reads a value that starts with '-' and is not a
    plain number (``-1e-3``, ``-.5``, ``-inf``) as an option and fails with "expected one argument"."""
    joined: list[str] = []
    for token in argv:
        previous = joined[-1] if joined else ""
        if _NEGATIVE_NUMBER.fullmatch(token) and previous.startswith("--") and "=" not in previous:
            joined[-1] = f"{previous}={token}"
        else:
            joined.append(token)
    return joined


def check_config_files(argv: list[str]) -> None:
    """Exits (code 2) naming the file, line and column when a ``--config``/``-c`` file is not valid
    YAML: jsonargparse parses the text and reports the error in "<unicode string>"."""
    for index, token in enumerate(argv):
        if token.startswith("--config="):
            path = token.partition("=")[2]
        elif token in ("--config", "-c") and index + 1 < len(argv):
            path = argv[index + 1]
        else:
            continue
        if not Path(path).is_file():
            continue  # jsonargparse reports a missing file (or a config given inline) itself
        with open(path) as file:
            try:
                yaml.safe_load(file)
            except yaml.YAMLError as error:
                sys.stderr.write(f"error: config file {path} is not valid YAML:\n{error}\n")
                raise SystemExit(2) from None


def main(args: list[str] | None = None) -> SSLCLI | None:
    argv = join_negative_values(sys.argv[1:] if args is None else list(args))
    if argv[:1] == ["list"]:
        print_registry()
        return None
    if argv[:1] == ["export"]:
        export_command(argv[1:])
        return None
    check_config_files(argv)
    if args is None:
        sys.argv[1:] = argv  # LightningCLI warns when given both args and a command line
    with subcommand_teardown():
        try:
            return SSLCLI(args=None if args is None else argv)
        except ValueError as error:
            data_error = _cause_of_type(error, DataSetupError)
            if data_error is None:
                raise
            sys.stderr.write(f"error: {data_error}\n")
            raise SystemExit(2) from None


def _cause_of_type(error: BaseException, kind: type[BaseException]) -> BaseException | None:
    while error is not None and not isinstance(error, kind):
        error = error.__cause__ or error.__context__
    return error
