"""``python -m ssl_lightning {fit,validate,test,predict,list} ...``: LightningCLI with short names."""

from __future__ import annotations

import sys

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from ssl_lightning import callbacks as callbacks_module
from ssl_lightning import datamodules as datamodules_module
from ssl_lightning.methods import METHODS

DATA_LINKS = ("batch_size", "num_classes", "in_chans", "image_size")


def datamodule_classes() -> dict[str, type]:
    return {
        name: obj for name in datamodules_module.__all__
        if isinstance(obj := getattr(datamodules_module, name), type)
        and issubclass(obj, L.LightningDataModule) and obj is not datamodules_module.ViewDataModule
    }


class SSLArgumentParser(LightningArgumentParser):
    """Adds the valid short names to jsonargparse's message when a model or data class is unknown."""

    def error(self, message: str, *args, **kwargs):
        hint = _unknown_name_hint(message)
        return super().error(message + hint if hint else message, *args, **kwargs)


def _unknown_name_hint(message: str) -> str:
    about_class = any(f'key "{key}"' in message for key in ("model", "data"))
    unresolved = ("import path", "not a subclass", "does not correspond to a subclass", "class_path")
    if not (about_class and any(marker in message.lower() for marker in unresolved)):
        return ""
    return (
        "\n\nssl_lightning: unknown class name. Valid short names:\n"
        f"  model: {', '.join(METHODS)}\n"
        f"  data:  {', '.join(datamodule_classes())}\n"
        "or give a full class path (e.g. my_package.MyMethod). `python -m ssl_lightning list` shows them all."
    )


class SSLCLI(LightningCLI):
    """LightningCLI with the optimizer as a method argument (``auto_configure_optimizers=False``)
    and the DataModule's batch size, classes, channels and image size linked into the method."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("model_class", L.LightningModule)
        kwargs.setdefault("datamodule_class", L.LightningDataModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(*args, parser_class=SSLArgumentParser, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for key in DATA_LINKS:
            parser.link_arguments(
                "data", f"model.init_args.{key}", compute_fn=_attribute_reader(key), apply_on="instantiate"
            )


def _attribute_reader(key: str):
    def read(datamodule):
        return getattr(datamodule, key, None)

    return read


def print_registry() -> None:
    lines = ["Methods (model: <name>):"]
    lines += [f"  {name:<16} {_first_doc_line(cls)}" for name, cls in METHODS.items()]
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


def main(args: list[str] | None = None) -> SSLCLI | None:
    argv = sys.argv[1:] if args is None else args
    if argv[:1] == ["list"]:
        print_registry()
        return None
    return SSLCLI(args=args)
