"""Test-time adaptation on regenerated CIFAR-10-C: every TTA recipe against one source classifier.

The evidence of issue 17: a source ``Classifier`` trained on CIFAR-10 (the JPEG copy in
``../shared/data``; ``cifar10_supervised.py --save-checkpoint`` makes one), the 15 corruptions at
severity 5 generated here from its test images, and each method of ``configs/tta/`` in the continual
protocol through ``python -m ssl_lightning.methods.tta.compare``. Reported: the per-domain error table
(one column per method, their mean) and each method's seconds per 10,000 images.

    python benchmarks/cifar10_supervised.py --epochs 5 --save-checkpoint benchmarks/results/tta/source.ckpt
    python benchmarks/cifar10c_tta.py --source-ckpt benchmarks/results/tta/source.ckpt --num-samples 1000

``--num-samples`` images per domain (a seeded subset of the 10,000; the benchmark uses all of them)
keep a CPU run short; the order of the methods is the reference table's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from ssl_lightning.methods import FAMILIES
from ssl_lightning.methods.tta.compare import main as compare
from ssl_lightning.methods.tta.report import read_error_table

from cifar10_supervised import machine  # beside this script
from report import emit

ROOT = Path(__file__).resolve().parents[1]
#: the recipes in the order of the benchmark's table (Source, BN, Tent, EATA, SAR, CoTTA, RMT, ROID)
ORDER = ["source", "bn_adapt", "tent", "eata", "sar", "cotta", "rmt", "roid"]


def data_override(args: argparse.Namespace, folder: Path) -> Path:
    """A config layered on every recipe: the JPEG copy as the source data, the subset, the workers."""
    override = {
        "data": {"class_path": "CorruptionStream", "init_args": {
            "source": {"class_path": "NpzArrays", "init_args": {"path": str(args.data), "num_workers": 0}},
            "num_samples": args.num_samples, "num_workers": args.num_workers, "cache_dir": str(args.cache_dir),
            "protocol": args.protocol,
        }},
        "trainer": {"logger": False, "accelerator": "auto"},
    }
    path = folder / "data_override.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(override))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source-ckpt", type=Path, required=True, help="a Classifier checkpoint on CIFAR-10")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cifar10_jpeg.npz")
    parser.add_argument("--methods", nargs="+", default=ORDER, help="recipe names: configs/tta/cifar10c_<name>.yaml")
    parser.add_argument("--num-samples", type=int, default=1000, help="images per domain (None in the benchmark)")
    parser.add_argument("--protocol", default="continual")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--cache-dir", type=Path, default=ROOT / "benchmarks" / "results" / "tta" / "cache")
    parser.add_argument("--root", type=Path, default=ROOT / "benchmarks" / "results" / "tta" / "runs")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cifar10c_tta.json")
    args = parser.parse_args()
    if not args.data.exists():
        parser.error(f"{args.data} not found: see ../shared/data/README.md for the CIFAR-10 JPEG copy")
    recipes = [ROOT / "configs" / "tta" / f"cifar10c_{name}.yaml" for name in args.methods]
    missing = [str(recipe) for recipe in recipes if not recipe.is_file()]
    if missing:
        parser.error(f"no recipe {', '.join(missing)}; registered TTA methods: {', '.join(FAMILIES['tta'])}")
    override = data_override(args, args.root)
    table = compare(["--source_ckpt", str(args.source_ckpt), "--configs", *map(str, recipes), "--root",
                     str(args.root), "--", "--config", str(override)])
    domains, errors = read_error_table(args.root / "tta_errors.csv")
    summaries = {recipe.stem: json.loads((args.root / recipe.stem / "tta_summary.json").read_text())
                 for recipe in recipes}
    emit({
        "protocol": f"{args.protocol}, the 15 corruptions at severity 5 regenerated from the CIFAR-10 test images "
                    f"(JPEG copy), {args.num_samples} images per domain (seeded subset), batch 200; each recipe of "
                    "configs/tta with its defaults, against one source Classifier",
        "source_ckpt": str(args.source_ckpt),
        "machine": machine(),
        "domains": domains,
        "errors": errors,
        "mean_error": {summary["method"]: summary["mean_error"] for summary in summaries.values()},
        "seconds_per_10k_images": {summary["method"]: summary["seconds_per_10k_images"]
                                   for summary in summaries.values()},
        "table": table,
    }, args.out)


if __name__ == "__main__":
    main()
