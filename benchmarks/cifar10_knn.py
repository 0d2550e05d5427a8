"""Evidence that the methods learn: every self-supervised method with a CIFAR-10 recipe, for the same budget.

Each method runs its recipe from ``configs/cifar10/`` (found through the registry) through the CLI, with the
backbone, batch, step budget and warm-up overridden from the command line, on the JPEG copy of
CIFAR-10 (``../shared/data/cifar10_jpeg.npz``). After training, kNN top-1 is reported for the
trained backbone, for the same architecture at random initialisation (seed 0), and for raw pixels.

Protocol: weighted kNN, k=200, T=0.1, cosine, backbone features in eval mode; bank = the 50,000
un-augmented training images; queries = the 10,000 test images. ``--train-images`` and
``--test-images`` take a class-stratified subset instead (the first N/10 images of each class, in
file order), written once to ``benchmarks/results/`` (git-ignored) and used for training, bank and
queries alike.

``--implementation lightly`` (or ``both``: ours, then lightly's, on adjacent rows) trains lightly's
implementation of each method that has one (``lightly_counterparts.py``: lightly's heads and loss in our
method, built from the same recipe arguments). It needs ``pip install lightly``, which ssl_lightning does
not depend on. ``--model-overrides key=value`` changes a recipe argument for both, e.g. queues sized for
a small subset (a queue must divide by the batch and hold no more than the training images).

    python benchmarks/cifar10_knn.py --steps 1500 --methods SimCLR BYOL --out benchmarks/results/cifar10_knn.json
    python benchmarks/cifar10_knn.py --implementation both --methods MoCoV2 --steps 3 --batch-size 32 \
        --train-images 500 --test-images 200 --num-workers 0 --model-overrides queue_size=256 --out /tmp/smoke.json
"""

from __future__ import annotations

import argparse
import inspect
import os
import time
from pathlib import Path

import numpy as np
import torch

from ssl_lightning.callbacks import KNNReport
from ssl_lightning.cli import SSLCLI
from ssl_lightning.methods import METHODS

from recipes import methods_with_recipes, recipe  # benchmarks/recipes.py, beside this script
from report import emit

ROOT = Path(__file__).resolve().parents[1]
SMALL_RESNET = '{"layers": [1, 1, 1, 1], "channels": [32, 64, 128, 256]}'


#: backbone architecture -> its random-init and raw-pixel kNN rows, measured by the first run that uses it
BASELINES: dict[str, dict[str, float]] = {}


def run_method(method: str, implementation: str, data: Path, args: argparse.Namespace) -> dict:
    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    applied = applicable_overrides(method, args.model_overrides)
    overrides = [arg for key, value in applied.items() for arg in (f"--model.init_args.{key}", value)]
    cli = SSLCLI(
        args=[
            "--config", str(recipe(method)),
            "--data", "NpzArrays", "--data.path", str(data), "--data.batch_size", str(args.batch_size),
            "--data.num_workers", str(args.num_workers), "--data.pin_memory", str(accelerator == "gpu").lower(),
            "--model.init_args.backbone_kwargs", args.backbone_kwargs,
            "--model.init_args.warmup_steps", str(args.steps // 10), *overrides,
            "--trainer.max_steps", str(args.steps), "--trainer.max_epochs", "-1",
            "--trainer.accelerator", accelerator, "--trainer.precision", args.precision,
            "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
            "--trainer.enable_checkpointing", "false", "--trainer.logger", "false",
            "--trainer.callbacks", "[]",
        ],
        run=False,
    )
    model = cli.model if implementation == "ours" else lightly_counterpart(method, cli.model)
    architecture = f"{model.hparams.get('backbone')} {model.hparams.get('backbone_kwargs')} " \
                   f"cifar_stem={model.hparams.get('cifar_stem')}"
    report = KNNReport(k=200, temperature=0.1, init_seed=0, baselines=architecture not in BASELINES)
    cli.trainer.callbacks.append(report)
    start = time.perf_counter()
    cli.trainer.fit(model, cli.datamodule)
    seconds = time.perf_counter() - start
    if report.baselines:
        BASELINES[architecture] = {name: report.results.pop(name) for name in list(report.results)
                                   if name.startswith("random init") or name == "raw pixels"}
    return {
        "method": method,
        "implementation": implementation,
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "steps": args.steps,
        "batch_size": args.batch_size,
        "model_overrides": applied,
        "train_seconds_incl_eval": round(seconds, 1),
        "knn_top1": {**report.results, **BASELINES[architecture]},  # baselines: shared by runs of one architecture
    }


def lightly_counterpart(method: str, ours) -> torch.nn.Module:
    """lightly's implementation of ``method`` built with the recipe arguments the CLI gave ours (the CLI's
    ``_class_path``/``_instantiator`` bookkeeping aside); the modules are built lazily at fit, after the
    recipe's seed, so the backbone starts from the same weights as ours."""
    from lightly_counterparts import LIGHTLY_COUNTERPARTS  # beside this script; needs `pip install lightly`

    init_args = {key: value for key, value in ours.hparams.items() if not key.startswith("_")}
    model = LIGHTLY_COUNTERPARTS[method](**init_args)
    if dict(model.hparams) != init_args:
        raise RuntimeError(f"lightly's {method} got other hyperparameters than ours: {dict(model.hparams)} vs {init_args}")
    return model


def stratified_subset(source: Path, train_images: int | None, test_images: int | None) -> Path:
    """The first N/num_classes images of each class of each split (file order), cached beside the results;
    ``source`` itself when neither count is given. Both npz layouts of ``NpzArrays`` are kept as they are."""
    if train_images is None and test_images is None:
        return source
    cached = ROOT / "benchmarks" / "results" / f"{source.stem}_train{train_images or 'all'}_test{test_images or 'all'}.npz"
    if cached.exists():
        return cached
    arrays = {}
    with np.load(source) as npz:
        jpeg = "train_jpeg" in npz.files
        keys = {"train": ("train_jpeg", "train_labels"), "test": ("test_jpeg", "test_labels")} if jpeg else \
            {"train": ("x_train", "y_train"), "test": ("x_test", "y_test")}
        if "classes" in npz.files:
            arrays["classes"] = npz["classes"]
        for split, count in (("train", train_images), ("test", test_images)):
            images_key, labels_key = keys[split]
            labels = npz[labels_key]
            keep = np.arange(len(labels)) if count is None else _first_of_each_class(labels, count, f"{source} {split}")
            arrays[labels_key] = labels[keep]
            if jpeg:
                offsets, data = npz[f"{split}_offsets"], npz[images_key]
                pieces = [data[offsets[i]: offsets[i + 1]] for i in keep]
                arrays[images_key] = np.concatenate(pieces)
                arrays[f"{split}_offsets"] = np.concatenate([[0], np.cumsum([len(p) for p in pieces])]).astype(np.int64)
            else:
                arrays[images_key] = npz[images_key][keep]
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_name(f"{cached.stem}.partial.npz")
    with open(partial, "wb") as file:  # a file object: np.savez adds no suffix
        np.savez(file, **arrays)
    os.replace(partial, cached)  # never a half-written cache
    return cached


def _first_of_each_class(labels: np.ndarray, count: int, where: str) -> np.ndarray:
    classes = np.unique(labels[labels >= 0])
    if count % len(classes):
        raise ValueError(f"{where}: {count} images cannot be split evenly over {len(classes)} classes; "
                         f"choose a multiple of {len(classes)}")
    per_class = count // len(classes)
    chosen = [np.flatnonzero(labels == c)[:per_class] for c in classes]
    short = [int(c) for c, rows in zip(classes, chosen) if len(rows) < per_class]
    if short:
        raise ValueError(f"{where}: classes {short} have fewer than {per_class} images")
    return np.sort(np.concatenate(chosen))


def applicable_overrides(method: str, overrides: list[tuple[str, str]]) -> dict[str, str]:
    """The ``--model-overrides`` that ``method``'s constructor takes (a queue size only where there is a queue)."""
    accepted = set().union(*(inspect.signature(cls.__init__).parameters for cls in METHODS[method].__mro__
                             if "__init__" in vars(cls)))
    return {key: value for key, value in overrides if key in accepted}


def key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value (a recipe argument of the model), got {text!r}")
    return key, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cifar10_jpeg.npz")
    ssl_methods = methods_with_recipes("ssl")
    parser.add_argument("--methods", nargs="+", choices=ssl_methods, default=ssl_methods)
    parser.add_argument("--implementation", choices=("ours", "lightly", "both"), default="ours",
                        help="ours, lightly's (pip install lightly), or both on adjacent rows")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-workers", type=int, default=8)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--backbone-kwargs", default=SMALL_RESNET, help="JSON builder arguments for timm resnet18")
    parser.add_argument("--train-images", type=int, default=None, help="class-stratified training subset (bank too)")
    parser.add_argument("--test-images", type=int, default=None, help="class-stratified test subset (kNN queries)")
    parser.add_argument("--model-overrides", nargs="+", type=key_value, default=[], metavar="KEY=VALUE",
                        help="recipe arguments passed as --model.init_args.KEY VALUE, e.g. queue_size=256")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cifar10_knn.json")
    args = parser.parse_args()
    if not args.data.exists():
        parser.error(f"{args.data} not found: see ../shared/data/README.md for the CIFAR-10 JPEG copy")
    unused = {key for key, _ in args.model_overrides} - {
        key for method in args.methods for key in applicable_overrides(method, args.model_overrides)}
    if unused:
        parser.error(f"--model-overrides {', '.join(sorted(unused))}: no method in --methods takes it")
    runs = [(method, "ours") for method in args.methods] if args.implementation == "ours" else []
    if args.implementation != "ours":
        try:
            from lightly_counterparts import LIGHTLY_COUNTERPARTS  # needs `pip install lightly`
        except ModuleNotFoundError as error:
            parser.error(str(error))
        missing = [method for method in args.methods if method not in LIGHTLY_COUNTERPARTS]
        if args.implementation == "lightly" and missing:
            parser.error(f"lightly has no counterpart of {', '.join(missing)} here; those with one: "
                         f"{', '.join(LIGHTLY_COUNTERPARTS)}")
        for method in args.methods:  # with both, ours then lightly's: adjacent rows
            runs += [(method, "ours")] * (args.implementation == "both")
            runs += [(method, "lightly")] * (method in LIGHTLY_COUNTERPARTS)
    try:
        data = stratified_subset(args.data, args.train_images, args.test_images)
    except ValueError as error:
        parser.error(str(error))
    with np.load(data) as npz:
        train_count, test_count = (len(npz[key]) for key in (("train_labels", "test_labels") if "train_labels" in
                                                              npz.files else ("y_train", "y_test")))
    subset = " (class-stratified subsets: the first N/10 of each class)" if data != args.data else ""
    results = {
        "protocol": f"kNN k=200 T=0.1 cosine on backbone feats (eval mode); bank = {train_count:,} un-augmented "
                    f"train images (also the training set), queries = {test_count:,} test images{subset}; "
                    "CIFAR-10 (JPEG copy)",
        "train_images": train_count,
        "test_images": test_count,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "backbone": f"timm resnet18 {args.backbone_kwargs}, CIFAR stem",
        "runs": [],
    }
    if args.implementation != "ours":
        import lightly

        results["lightly_version"] = lightly.__version__
    for method, implementation in runs:
        results["runs"].append(run_method(method, implementation, data, args))
        emit(results, args.out)  # after each run, so a cut-short benchmark keeps what it measured


if __name__ == "__main__":
    main()
