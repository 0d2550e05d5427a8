"""Evidence that the supervised pipeline is right: ``Classifier`` on CIFAR-10 (JPEG copy) for a fixed budget.

The recipe ``configs/cifar10/classifier.yaml`` (SGD + Nesterov, LR 0.2 per 256 images, weight decay
5e-4, cosine without warm-up, batch 128, padded crop + flip) runs through the CLI on the JPEG copy of
CIFAR-10 (``../shared/data/cifar10_jpeg.npz``), with the backbone and the number of epochs set here,
and without validation during the fit. Then ``test`` scores the test images (10,000, un-augmented).

Reported: test top-1 / top-5, the fit's wall time and seconds per epoch, training images per second
(training images x epochs / fit time), and the machine.

    # the CPU budget: cifar10_knn.py's small ResNet, 10 epochs
    python benchmarks/cifar10_supervised.py --epochs 10 --out benchmarks/results/cifar10_supervised.json
    # a GPU: the recipe's ResNet-18, shortened
    python benchmarks/cifar10_supervised.py --backbone-kwargs '{}' --epochs 30 --precision bf16-mixed --num-workers 14
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import lightning as L
import torch

from ssl_lightning.cli import SSLCLI

from recipes import recipe  # benchmarks/recipes.py, beside this script
from report import emit

ROOT = Path(__file__).resolve().parents[1]
SMALL_RESNET = '{"layers": [1, 1, 1, 1], "channels": [32, 64, 128, 256]}'  # as in cifar10_knn.py


class EpochClock(L.Callback):
    """Host seconds of each training epoch (the loss is read by the progress bar, so the device is done)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        self.seconds.append(time.perf_counter() - self._start)


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "cpu": cpu, "cpu_threads": torch.get_num_threads(), "torch": torch.__version__, "lightning": L.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cifar10_jpeg.npz")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--backbone-kwargs", default=SMALL_RESNET, help="JSON builder arguments for timm resnet18")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cifar10_supervised.json")
    parser.add_argument("--save-checkpoint", type=Path, default=None,
                        help="also save the trained Classifier here (the source model of cifar10c_tta.py)")
    args = parser.parse_args()
    if not args.data.exists():
        parser.error(f"{args.data} not found: see ../shared/data/README.md for the CIFAR-10 JPEG copy")

    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    clock = EpochClock()
    cli = SSLCLI(
        args=[
            "--config", str(recipe("Classifier")),
            "--data", "NpzArrays", "--data.path", str(args.data), "--data.batch_size", str(args.batch_size),
            "--data.num_workers", str(args.num_workers), "--data.views", "supervised",
            "--data.pin_memory", str(accelerator == "gpu").lower(),
            "--model.init_args.backbone_kwargs", args.backbone_kwargs,
            "--trainer.max_epochs", str(args.epochs), "--trainer.accelerator", accelerator,
            "--trainer.precision", args.precision, "--trainer.limit_val_batches", "0",
            "--trainer.num_sanity_val_steps", "0", "--trainer.enable_checkpointing", "false",
            "--trainer.logger", "false", "--trainer.callbacks", "[]",
            "--trainer.default_root_dir", str(args.out.parent / "cifar10_supervised_run"),
        ],
        run=False,
    )
    cli.trainer.callbacks.append(clock)
    start = time.perf_counter()
    cli.trainer.fit(cli.model, cli.datamodule)
    fit_seconds = time.perf_counter() - start
    if args.save_checkpoint is not None:
        cli.trainer.save_checkpoint(args.save_checkpoint)
    start = time.perf_counter()
    tested = cli.trainer.test(cli.model, cli.datamodule, verbose=False)[0]
    test_seconds = time.perf_counter() - start
    train_images = len(cli.datamodule.plain_dataloader("train").dataset)
    test_images = len(cli.datamodule.plain_dataloader("val").dataset)
    emit({
        "protocol": f"Classifier, configs/cifar10/classifier.yaml with timm resnet18 {args.backbone_kwargs} "
                    f"(CIFAR stem), {args.epochs} epochs at batch {args.batch_size}, no validation during the fit; "
                    f"top-1 / top-5 of `test` on the {test_images:,} un-augmented test images; CIFAR-10 (JPEG copy)",
        "machine": machine(),
        "precision": args.precision,
        "test_top1": round(100 * tested["test/top1"], 2),
        "test_top5": round(100 * tested["test/top5"], 2),
        "fit_seconds": round(fit_seconds, 1),
        "seconds_per_epoch": [round(s, 1) for s in clock.seconds],
        "train_images_per_second": round(train_images * args.epochs / fit_seconds, 1),
        "test_seconds": round(test_seconds, 1),
    }, args.out)


if __name__ == "__main__":
    main()
