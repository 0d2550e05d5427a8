"""Import paths from before the method-families layout (docs/architecture.md), kept working.

Configs, checkpoints (``_class_path``) and user code name classes by import path. The names
recorded by the CLI (``ssl_lightning.methods.LinearProbe``) and the module paths of the old layout
(``ssl_lightning.methods.simclr``) still import, with a ``FutureWarning`` that names the new place;
the objects are the new ones, so ``isinstance`` and ``load_from_checkpoint`` behave as before.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

#: old module -> the modules that now hold its names (searched in order)
MOVED_MODULES: dict[str, tuple[str, ...]] = {
    "ssl_lightning.heads": ("ssl_lightning.components.heads",),
    "ssl_lightning.methods.base": ("ssl_lightning.methods.ssl.base",),
    "ssl_lightning.methods.simclr": ("ssl_lightning.methods.ssl.simclr",),
    "ssl_lightning.methods.byol": ("ssl_lightning.methods.ssl.byol",),
    "ssl_lightning.methods.barlow_twins": ("ssl_lightning.methods.ssl.barlow_twins",),
    "ssl_lightning.methods.teacher": ("ssl_lightning.components.teacher",),
    "ssl_lightning.methods.optimization": ("ssl_lightning.core.optimization", "ssl_lightning.core.step_logging"),
    "ssl_lightning.methods.nonfinite": ("ssl_lightning.core.nonfinite",),
    "ssl_lightning.methods.data_link": ("ssl_lightning.core.data_link",),
    "ssl_lightning.methods.pretrained": ("ssl_lightning.evaluation.pretrained",),
    "ssl_lightning.methods.frozen": ("ssl_lightning.evaluation.frozen",),
    "ssl_lightning.methods.linear_probe": ("ssl_lightning.evaluation.linear_probe",),
    "ssl_lightning.methods.knn_eval": ("ssl_lightning.evaluation.knn",),
    "ssl_lightning.methods.finetune": ("ssl_lightning.evaluation.finetune",),
}

#: old modules whose name now means something else in their package: importing them fails, naming
#: where their contents went (``ssl_lightning.callbacks.rankme`` is now the RankMe function)
RETIRED_MODULES: dict[str, str] = {
    "ssl_lightning.callbacks.rankme": "SpectrumCallback is in ssl_lightning.callbacks (module ssl_lightning.callbacks."
    "spectrum); the name ssl_lightning.callbacks.rankme is the RankMe function of ssl_lightning.metrics",
}

#: package -> {old public name: the package that holds it now}
MOVED_NAMES: dict[str, dict[str, str]] = {
    "ssl_lightning.methods": {
        "EMATeacher": "ssl_lightning.components",
        "LinearProbe": "ssl_lightning.evaluation",
        "KNNEvaluation": "ssl_lightning.evaluation",
        "FineTune": "ssl_lightning.evaluation",
        "EVALUATIONS": "ssl_lightning.evaluation",
    },
    "ssl_lightning.callbacks": {
        name: "ssl_lightning.metrics"
        for name in ("knn_accuracy", "knn_scores", "rankme", "effective_rank", "alpha_req", "singular_values")
    },
}


def _warn(old: str, new: str) -> None:
    warnings.warn(
        f"{old} moved to {new} (docs/architecture.md); the old path still works for now: update imports and "
        "class_path entries in configs.",
        FutureWarning,
        stacklevel=3,
    )


def moved_attribute(package: str, name: str):
    """A package's ``__getattr__`` for the names in ``MOVED_NAMES`` (AttributeError for any other)."""
    new = MOVED_NAMES.get(package, {}).get(name)
    if new is None:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    _warn(f"{package}.{name}", f"{new}.{name}")
    return getattr(importlib.import_module(new), name)


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old module path as a module whose attributes come from the new modules."""

    def find_spec(self, fullname, path, target=None):
        if fullname in RETIRED_MODULES:
            raise ModuleNotFoundError(f"{fullname} was removed: {RETIRED_MODULES[fullname]}.", name=fullname)
        return importlib.util.spec_from_loader(fullname, self) if fullname in MOVED_MODULES else None

    def create_module(self, spec):
        return None  # the default module object

    def exec_module(self, module: types.ModuleType) -> None:
        targets = [importlib.import_module(name) for name in MOVED_MODULES[module.__name__]]
        _warn(module.__name__, " and ".join(target.__name__ for target in targets))

        def __getattr__(name: str):
            for target in targets:
                if hasattr(target, name):
                    return getattr(target, name)
            raise AttributeError(f"module {module.__name__!r} (moved to {targets[0].__name__}) has no attribute {name!r}")

        module.__getattr__ = __getattr__


def install() -> None:
    """Adds the finder once; after the regular finders, so it only sees paths no file answers."""
    if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModules())
