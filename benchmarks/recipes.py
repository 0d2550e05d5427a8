"""The methods and their recipes as the benchmarks find them: from the registry (``METHODS``,
``FAMILIES``) and the recipe files, not from lists of their own."""

from __future__ import annotations

from pathlib import Path

import yaml

from ssl_lightning.methods import FAMILIES, METHODS

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def recipes(dataset: str = "cifar10") -> dict[str, Path]:
    """Method short name -> its recipe in ``configs/<dataset>/``: the file whose model is that method, the
    first by file name when there are several (a variant such as ``byol_vit.yaml`` sorts after ``byol.yaml``)."""
    found = {}
    for path in sorted((CONFIGS / dataset).glob("*.yaml")):
        class_path = (yaml.safe_load(path.read_text()).get("model") or {}).get("class_path", "")
        name = class_path.rsplit(".", 1)[-1]
        if name in METHODS:
            found.setdefault(name, path)
    return found


#: init_args through which a recipe reads an earlier run's or a download's files (a pipeline's later stage)
READS_OTHER_FILES = ("teacher_ckpt", "init_ckpt", "init_weights", "pretrained")


def reads_other_files(path: Path) -> bool:
    """Whether a recipe starts from files another run (or a download) makes: such a stage of a pipeline
    (``mae_self_distill.yaml`` after ``mae_further_pretrain.yaml``) cannot run on its own."""
    init_args = (yaml.safe_load(path.read_text()).get("model") or {}).get("init_args") or {}
    return any(init_args.get(key) is not None for key in READS_OTHER_FILES)


def methods_with_recipes(family: str | None = None, dataset: str = "cifar10") -> list[str]:
    """The registered methods (of one family, or all) whose recipe for ``dataset`` runs on its own, in
    registry order (a pipeline's later stages are left out: ``reads_other_files``)."""
    names = FAMILIES[family] if family is not None else METHODS
    available = recipes(dataset)
    return [name for name in names if name in available and not reads_other_files(available[name])]


def recipe(method: str, dataset: str = "cifar10") -> Path:
    available = recipes(dataset)
    if method not in available:
        raise ValueError(f"no recipe for {method} in configs/{dataset}/; recipes there: {', '.join(available)}")
    return available[method]
