"""Evidence that the methods learn: every self-supervised method with a CIFAR-10 recipe, for the same budget.

Each method runs its recipe from ``configs/cifar10/`` (found through the registry) through the CLI, with the
backbone, batch, step budget and warm-up overridden from the command line, on the JPEG copy of
CIFAR-10 (``../shared/data/cifar10_jpeg.npz``). After training, kNN top-1 is reported for the
trained backbone, for the same architecture at random initialisation (seed 0), and for raw pixels.

Backbones: a recipe's architecture decides. A ResNet recipe runs timm's resnet18 with ``--backbone-kwargs``
(default a small ResNet-18) over the recipe's own ``backbone_kwargs`` (Random Teachers keeps its
``zero_init_last: false``); a ViT recipe (``vit_*``/``deit_*``: iBOT, MAE, ``dino_vit``) runs ``--vit-backbone``
with ``--vit-backbone-kwargs`` over the recipe's (default a CPU-sized ViT: 4 blocks of width 192, 3 heads,
patches of 4 on 32 px, ``dynamic_img_size`` for multi-crop's local crops), so every ViT method shares one
architecture. The random-init and raw-pixel rows are measured once per architecture (``BASELINES``).
``--methods`` takes method names (their first recipe) and recipe variants by file stem, e.g. ``dino_vit``:
DINO on the same ViT as iBOT (``dino_vit.yaml``), for a like-for-like DINO / iBOT row.

Protocol: weighted kNN, k=200, T=0.1, cosine, backbone features in eval mode; bank = the 50,000
un-augmented training images; queries = the 10,000 test images. ``--train-images`` and
``--test-images`` take a class-stratified subset instead (the first N/10 images of each class, in
file order), written once to ``benchmarks/results/`` (git-ignored) and used for training, bank and
queries alike.

MAE's paper evaluates it by fine-tuning and by linear probing, not kNN, so the methods in ``--linear-probe``
(default MAE) are also evaluated after the same budget by a linear probe on the frozen backbone
(``LinearProbe`` with ``configs/eval/linear.yaml``: features of the un-augmented training images computed
once in eval mode, a linear classifier trained ``--linear-epochs`` epochs (linear.yaml's 100) with SGD, LR
0.1, momentum 0.9, no weight decay, cosine per step, at ``--batch-size``; top-1 on the same test images as
kNN). It is recorded as ``linear_top1`` beside the kNN numbers, for the trained backbone and for the
method's own initial weights (a checkpoint at the start of training; MAE initialises its encoder its own
way, not timm's, so the kNN random-init row is not its starting point). The MAE paper's linear probe
(its appendix) puts a BatchNorm without affine parameters before the classifier and trains with LARS;
LinearProbe has neither. The paper's headline protocol, fine-tuning (``FineTune``), costs a full training
run per method and is not run here.

``--implementation lightly`` (or ``both``: ours, then lightly's, on adjacent rows) trains lightly's
implementation of each method that has one (``lightly_counterparts.py``: lightly's heads and loss in our
method, built from the same recipe arguments). It needs ``pip install lightly``, which ssl_lightning does
not depend on. ``--model-overrides key=value`` changes a recipe argument for both, e.g. queues sized for
a small subset (a queue must divide by the batch and hold no more than the training images).

    python benchmarks/cifar10_knn.py --steps 1500 --methods SimCLR BYOL --out benchmarks/results/cifar10_knn.json
    python benchmarks/cifar10_knn.py --implementation both --methods MoCoV2 --steps 3 --batch-size 32 \
        --train-images 500 --test-images 200 --num-workers 0 --model-overrides queue_size=256 --out /tmp/smoke.json
    python benchmarks/cifar10_knn.py --implementation both --methods dino_vit IBOT MAE RandomTeachers --steps 3 \
        --batch-size 32 --train-images 500 --test-images 200 --num-workers 0 --linear-epochs 2 --out /tmp/vit.json
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
import yaml

from ssl_lightning.callbacks import KNNReport
from ssl_lightning.cli import SSLCLI
from ssl_lightning.methods import FAMILIES, METHODS

from recipes import CONFIGS, methods_with_recipes, reads_other_files, recipe  # benchmarks/recipes.py
from report import emit

ROOT = Path(__file__).resolve().parents[1]
SMALL_RESNET = '{"layers": [1, 1, 1, 1], "channels": [32, 64, 128, 256]}'
#: every ViT method's backbone by default: small enough for a CPU, patch 4 on 32 px as the ViT recipes
TINY_VIT = '{"img_size": 32, "patch_size": 4, "embed_dim": 192, "depth": 4, "num_heads": 3, "dynamic_img_size": true}'
VIT = "vit_tiny_patch16_224"  # its embed_dim / num_heads / depth / patch are TINY_VIT's
#: timm model families the harness gives --vit-backbone (a recipe's backbone name before the first "_")
VIT_FAMILIES = ("vit", "deit")
LINEAR_EVAL = ROOT / "configs" / "eval" / "linear.yaml"


#: backbone architecture -> its random-init and raw-pixel kNN rows, measured by the first run that uses it
BASELINES: dict[str, dict[str, float]] = {}


def run_method(method: str, recipe_path: Path, implementation: str, data: Path, args: argparse.Namespace) -> dict:
    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    applied = applicable_overrides(method, args.model_overrides)
    overrides = [arg for key, value in applied.items() for arg in (f"--model.init_args.{key}", value)]
    cli = SSLCLI(
        args=[
            "--config", str(recipe_path),
            "--data", "NpzArrays", "--data.path", str(data), "--data.batch_size", str(args.batch_size),
            "--data.num_workers", str(args.num_workers), "--data.pin_memory", str(accelerator == "gpu").lower(),
            *backbone_arguments(method, recipe_path, args),
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
    probed = method in args.linear_probe
    with tempfile.TemporaryDirectory(prefix="knn_linear_") as scratch:
        scratch = Path(scratch)
        if probed:
            cli.trainer.callbacks.append(SaveInitialWeights(scratch / "initial.ckpt"))
        start = time.perf_counter()
        cli.trainer.fit(model, cli.datamodule)
        seconds = time.perf_counter() - start
        if report.baselines:
            BASELINES[architecture] = {name: report.results.pop(name) for name in list(report.results)
                                       if name.startswith("random init") or name == "raw pixels"}
        run = {
            "method": method,
            "recipe": str(recipe_path.relative_to(ROOT)),
            "implementation": implementation,
            "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
            "backbone": architecture,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "model_overrides": applied,
            "train_seconds_incl_eval": round(seconds, 1),
            "knn_top1": {**report.results, **BASELINES[architecture]},  # baselines: shared by runs of one architecture
        }
        if probed:
            cli.trainer.save_checkpoint(scratch / "trained.ckpt")
            start = time.perf_counter()
            run["linear_top1"] = {
                "trained backbone": linear_top1(recipe_path, scratch / "trained.ckpt", data, args, scratch / "trained"),
                "initial weights": linear_top1(recipe_path, scratch / "initial.ckpt", data, args, scratch / "initial"),
            }
            run["linear_probe_seconds"] = round(time.perf_counter() - start, 1)
    return run


class SaveInitialWeights(L.Callback):
    """Writes the method's checkpoint as training starts: its own initial weights, the linear probe's baseline."""

    def __init__(self, path: Path):
        self.path = path

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.save_checkpoint(self.path)


def linear_top1(recipe_path: Path, checkpoint: Path, data: Path, args: argparse.Namespace, run_dir: Path) -> float:
    """Top-1 (percent) of ``LinearProbe`` on ``checkpoint``'s frozen backbone, through the CLI as a user runs it
    (the recipe, then ``configs/eval/linear.yaml``), on the benchmark's data, batch and precision; validated once,
    after the last epoch (the probe's cached features do not change between epochs)."""
    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    cli = SSLCLI(
        args=[
            "--config", str(recipe_path), "--config", str(LINEAR_EVAL), "--model.pretrained", str(checkpoint),
            "--data", "NpzArrays", "--data.path", str(data), "--data.batch_size", str(args.batch_size),
            "--data.num_workers", str(args.num_workers), "--data.pin_memory", str(accelerator == "gpu").lower(),
            "--data.views", "none", "--data.drop_last", "false",
            "--trainer.max_epochs", str(args.linear_epochs), "--trainer.check_val_every_n_epoch", str(args.linear_epochs),
            "--trainer.accelerator", accelerator, "--trainer.precision", args.precision,
            "--trainer.num_sanity_val_steps", "0", "--trainer.enable_checkpointing", "false",
            "--trainer.logger", "false", "--trainer.callbacks", "[]", "--trainer.default_root_dir", str(run_dir),
        ],
        run=False,
    )
    cli.trainer.fit(cli.model, cli.datamodule)
    return round(100.0 * float(cli.trainer.callback_metrics["val/linear_top1"]), 2)


def recipe_backbone(method: str, recipe_path: Path) -> tuple[str, dict]:
    """The backbone name and ``backbone_kwargs`` a recipe sets (the method's default name where it sets none)."""
    init_args = (yaml.safe_load(recipe_path.read_text()).get("model") or {}).get("init_args") or {}
    name = init_args.get("backbone")
    if name is None:
        name = next(inspect.signature(cls.__init__).parameters["backbone"].default for cls in METHODS[method].__mro__
                    if "__init__" in vars(cls) and "backbone" in inspect.signature(cls.__init__).parameters)
    return name, dict(init_args.get("backbone_kwargs") or {})


def is_vit(backbone: str) -> bool:
    return backbone.split("_")[0] in VIT_FAMILIES


def backbone_arguments(method: str, recipe_path: Path, args: argparse.Namespace) -> list[str]:
    """The CLI arguments that put ``method`` on the benchmark's backbone: ``--vit-backbone`` with
    ``--vit-backbone-kwargs`` for a ViT recipe, the recipe's ResNet with ``--backbone-kwargs``; either over the
    recipe's own ``backbone_kwargs`` (a key in both takes the command line's value)."""
    name, kwargs = recipe_backbone(method, recipe_path)
    if is_vit(name):
        return ["--model.init_args.backbone", args.vit_backbone,
                "--model.init_args.backbone_kwargs", json.dumps({**kwargs, **json.loads(args.vit_backbone_kwargs)})]
    return ["--model.init_args.backbone_kwargs", json.dumps({**kwargs, **json.loads(args.backbone_kwargs)})]


def recipe_variants(dataset: str = "cifar10") -> dict[str, tuple[str, Path]]:
    """Recipe file stem -> (method, path) for every self-supervised recipe that runs on its own, the variants
    (``dino_vit``) included: what ``--methods`` takes besides method names."""
    ssl = set(methods_with_recipes("ssl", dataset)) | set(FAMILIES["ssl"])
    found = {}
    for path in sorted((CONFIGS / dataset).glob("*.yaml")):
        name = ((yaml.safe_load(path.read_text()).get("model") or {}).get("class_path") or "").rsplit(".", 1)[-1]
        if name in ssl and not reads_other_files(path):
            found[path.stem] = (name, path)
    return found


def resolve(entry: str) -> tuple[str, Path]:
    """A ``--methods`` entry as (method, recipe): a method name takes its first recipe, a file stem that file."""
    return (entry, recipe(entry)) if entry in METHODS else recipe_variants()[entry]


def json_object(text: str) -> str:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"expected a JSON object of builder arguments, got {text!r}: {error}")
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object of builder arguments, got {text!r}")
    return text


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
    variants = [stem for stem, (method, path) in recipe_variants().items() if path != recipe(method)]
    parser.add_argument("--methods", nargs="+", choices=ssl_methods + variants, default=ssl_methods,
                        help="method names (their first recipe) or recipe file stems (a variant: dino_vit)")
    parser.add_argument("--implementation", choices=("ours", "lightly", "both"), default="ours",
                        help="ours, lightly's (pip install lightly), or both on adjacent rows")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-workers", type=int, default=8)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--backbone-kwargs", type=json_object, default=SMALL_RESNET,
                        help="JSON builder arguments for timm resnet18 (ResNet recipes), over the recipe's own")
    parser.add_argument("--vit-backbone", default=VIT, help="the timm ViT every ViT recipe runs")
    parser.add_argument("--vit-backbone-kwargs", type=json_object, default=TINY_VIT,
                        help="JSON builder arguments for --vit-backbone (ViT recipes), over the recipe's own")
    parser.add_argument("--linear-probe", nargs="*", choices=ssl_methods, default=["MAE"], metavar="METHOD",
                        help="methods also evaluated by a linear probe on the frozen backbone (MAE's protocol)")
    linear_epochs = yaml.safe_load(LINEAR_EVAL.read_text())["trainer"]["max_epochs"]
    parser.add_argument("--linear-epochs", type=int, default=linear_epochs,
                        help=f"the linear probe's epochs (configs/eval/linear.yaml: {linear_epochs})")
    parser.add_argument("--train-images", type=int, default=None, help="class-stratified training subset (bank too)")
    parser.add_argument("--test-images", type=int, default=None, help="class-stratified test subset (kNN queries)")
    parser.add_argument("--model-overrides", nargs="+", type=key_value, default=[], metavar="KEY=VALUE",
                        help="recipe arguments passed as --model.init_args.KEY VALUE, e.g. queue_size=256")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cifar10_knn.json")
    args = parser.parse_args()
    if not args.data.exists():
        parser.error(f"{args.data} not found: see ../shared/data/README.md for the CIFAR-10 JPEG copy")
    if args.linear_epochs < 1:
        parser.error(f"--linear-epochs must be at least 1, got {args.linear_epochs}")
    entries = [resolve(entry) for entry in args.methods]  # (method, recipe)
    unused = {key for key, _ in args.model_overrides} - {
        key for method, _ in entries for key in applicable_overrides(method, args.model_overrides)}
    if unused:
        parser.error(f"--model-overrides {', '.join(sorted(unused))}: no method in --methods takes it")
    runs = [(method, path, "ours") for method, path in entries] if args.implementation == "ours" else []
    if args.implementation != "ours":
        try:
            from lightly_counterparts import LIGHTLY_COUNTERPARTS  # needs `pip install lightly`
        except ModuleNotFoundError as error:
            parser.error(str(error))
        missing = [method for method, _ in entries if method not in LIGHTLY_COUNTERPARTS]
        if args.implementation == "lightly" and missing:
            parser.error(f"lightly has no counterpart of {', '.join(missing)} here; those with one: "
                         f"{', '.join(LIGHTLY_COUNTERPARTS)}")
        for method, path in entries:  # with both, ours then lightly's: adjacent rows
            runs += [(method, path, "ours")] * (args.implementation == "both")
            runs += [(method, path, "lightly")] * (method in LIGHTLY_COUNTERPARTS)
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
        "backbone": f"ResNet recipes: timm resnet18 {args.backbone_kwargs} over the recipe's backbone_kwargs, CIFAR "
                    f"stem; ViT recipes: timm {args.vit_backbone} {args.vit_backbone_kwargs} over the recipe's",
        "runs": [],
    }
    if any(method in args.linear_probe for method, _, _ in runs):
        results["linear_protocol"] = (
            f"{', '.join(args.linear_probe)}: also a linear probe on the frozen backbone (MAE's paper evaluates by "
            f"fine-tuning and linear probing, not kNN): LinearProbe with configs/eval/linear.yaml (SGD lr 0.1, "
            f"momentum 0.9, no weight decay, cosine per step, features of the un-augmented train images cached "
            f"once, no BatchNorm before the classifier, unlike the MAE paper's probe), {args.linear_epochs} epochs at "
            f"batch {args.batch_size}; top-1 on the kNN query images; for the trained backbone and the method's "
            "initial weights (a checkpoint as training starts)")
    if args.implementation != "ours":
        import lightly

        results["lightly_version"] = lightly.__version__
    for method, path, implementation in runs:
        results["runs"].append(run_method(method, path, implementation, data, args))
        emit(results, args.out)  # after each run, so a cut-short benchmark keeps what it measured


if __name__ == "__main__":
    main()
