"""Evidence that the methods learn: every self-supervised method with a CIFAR-10 recipe, for the same budget.

Each method runs its recipe from ``configs/cifar10/`` (found through the registry) through the CLI, with the
backbone, batch, step budget and warm-up overridden from the command line, on the JPEG copy of
CIFAR-10 (``../shared/data/cifar10_jpeg.npz``). After training, kNN top-1 is reported for the
trained backbone, for the same architecture at random initialisation (seed 0), and for raw pixels.

Protocol: weighted kNN, k=200, T=0.1, cosine, backbone features in eval mode; bank = the 50,000
un-augmented training images; queries = the 10,000 test images.

    python benchmarks/cifar10_knn.py --steps 1500 --methods SimCLR BYOL --out benchmarks/results/cifar10_knn.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ssl_lightning.callbacks import KNNReport
from ssl_lightning.cli import SSLCLI

from recipes import methods_with_recipes, recipe  # benchmarks/recipes.py, beside this script
from report import emit

ROOT = Path(__file__).resolve().parents[1]
SMALL_RESNET = '{"layers": [1, 1, 1, 1], "channels": [32, 64, 128, 256]}'


def run_method(method: str, args: argparse.Namespace) -> dict:
    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    report = KNNReport(k=200, temperature=0.1, init_seed=0)
    cli = SSLCLI(
        args=[
            "--config", str(recipe(method)),
            "--data", "NpzArrays", "--data.path", str(args.data), "--data.batch_size", str(args.batch_size),
            "--data.num_workers", str(args.num_workers), "--data.pin_memory", str(accelerator == "gpu").lower(),
            "--model.init_args.backbone_kwargs", args.backbone_kwargs,
            "--model.init_args.warmup_steps", str(args.steps // 10),
            "--trainer.max_steps", str(args.steps), "--trainer.max_epochs", "-1",
            "--trainer.accelerator", accelerator, "--trainer.precision", args.precision,
            "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
            "--trainer.enable_checkpointing", "false", "--trainer.logger", "false",
            "--trainer.callbacks", "[]",
        ],
        run=False,
    )
    cli.trainer.callbacks.append(report)
    start = time.perf_counter()
    cli.trainer.fit(cli.model, cli.datamodule)
    seconds = time.perf_counter() - start
    return {
        "method": method,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "train_seconds_incl_eval": round(seconds, 1),
        "knn_top1": report.results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cifar10_jpeg.npz")
    ssl_methods = methods_with_recipes("ssl")
    parser.add_argument("--methods", nargs="+", choices=ssl_methods, default=ssl_methods)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-workers", type=int, default=8)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--backbone-kwargs", default=SMALL_RESNET, help="JSON builder arguments for timm resnet18")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cifar10_knn.json")
    args = parser.parse_args()
    if not args.data.exists():
        parser.error(f"{args.data} not found: see ../shared/data/README.md for the CIFAR-10 JPEG copy")

    results = {
        "protocol": "kNN k=200 T=0.1 cosine on backbone feats (eval mode); bank = 50,000 un-augmented train "
                    "images, queries = 10,000 test images; CIFAR-10 (JPEG copy)",
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "backbone": f"timm resnet18 {args.backbone_kwargs}, CIFAR stem",
        "runs": [],
    }
    for method in args.methods:
        results["runs"].append(run_method(method, args))
        emit(results, args.out)  # after each method, so a cut-short run keeps what it measured


if __name__ == "__main__":
    main()
