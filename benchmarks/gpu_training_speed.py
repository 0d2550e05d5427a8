"""Training speed on one GPU: ResNet-18 (CIFAR stem) with the CIFAR-10 recipes of SimCLR, BYOL and
Barlow Twins (``configs/cifar10/<method>.yaml``), on the JPEG copy of CIFAR-10 through ``NpzArrays``.

Two measurements per method:

1. **Images per second and the projected 200-epoch time.** ``Trainer.fit`` runs ``--epochs``
   epochs (default 4): the first is warm-up (cuDNN and allocator warm-up, the in-memory dataset's
   copy to the GPU, compilation with ``--compile``), the others are steady state. A callback reads
   the clock at the start of training and at the end of every epoch, each time after
   ``torch.cuda.synchronize()``, so an epoch's time runs from the end of the one before to its own
   end (epoch boundaries included, as 200 epochs would pay them). images/s = steps x batch / epoch
   time (each image makes two views); projected 200 epochs = 200 x the median steady epoch.
   Data paths: ``device_views_in_memory`` (``view_device=device, in_memory=True``: the uint8
   training split on the GPU, batches of indices, views drawn batched on the GPU, the fastest
   path) and, with ``--cpu-view-workers N``, ``cpu_views_N_workers`` (``view_device=cpu``: JPEG
   decode and torchvision v2 views per image in N persistent DataLoader workers).
2. **Device views against pre-made views** (the issue's "views never the bottleneck": within 5%).
   Both runs are the same ``Trainer.fit`` of the same method, batch and settings, and time steps
   ``--warmup-steps`` + 1 to ``--warmup-steps`` + ``--timed-steps`` between two synchronised clock
   readings. *Device views*: the in-memory path of (1). *Pre-made*: a DataLoader that yields,
   every step, one batch that the device-views run itself trained on (captured there, views
   already on the GPU). The pre-made run therefore has no data work per step at all (no sampler,
   no collation, no gather, no views), so the ratio device / pre-made charges the whole in-memory
   data path to the views, the strictest reading of "views never the bottleneck"; everything else
   (Lightning's loop, the online probe, logging, the optimizer, the EMA teacher) is the same code.
   Runs alternate (device, pre-made, ...) ``--repeats`` times; the figures are medians. With
   ``--compile-views`` both measurements add device views drawn through ``torch.compile``
   (``data.compile_views``), timed after the compilation (it happens in the warm-up epoch / steps).

Settings, stated in the output: the recipe's model, optimizer and views; ``--precision`` (default
the recipes' 16-mixed; ``bf16-mixed`` is the usual choice on Hopper); ``--channels-last``,
``--cudnn-benchmark`` and ``--compile`` are off unless given. No validation, kNN, logger, progress
bar or checkpoints: training alone (``framework_overhead.py --device cuda`` times the CLI's
defaults, bar and logger included).

Lightly's published CIFAR-10 runtimes (https://docs.lightly.ai/getting_started/benchmarks.html,
"CIFAR-10" table, 200 epochs, ResNet-18 with a CIFAR stem): SimCLR 97.7 min at batch 128 and
87.1 min at batch 512; BYOL 121.9 and 108.3 min; Barlow Twins 375.9 and 153.3 min. Their GPU, from
the docstring of lightly's ``cifar10_benchmark.py`` (table "Updated: 27.03.2023"): "a single NVIDIA
RTX A6000". Their runtimes include a kNN evaluation over all 60,000 images after every epoch, their
views are made per image by PIL in 8 DataLoader workers, and their SimCLR and BYOL heads are
narrower (hidden widths 512 and 1024 in their script, 2048 and 4096 in these recipes); the GPU
differs (A6000 vs H100) and so may the batch size (run ``--batch-size 128`` to match theirs).
They sit beside our projection in the output as context, not as a like-for-like comparison.

On the GPU machine (the device tool runs in the repository root; carry ``.devdata``, which is
git-ignored, holding the 56 MB npz and the three wheels the device image lacks). Here, once:

    mkdir -p .devdata/whl && cp ../shared/data/cifar10_jpeg.npz .devdata/
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        -d .devdata/whl jsonargparse==4.53.0 docstring_parser==0.18.0 typeshed_client==2.14.0

Then, with ``carry: [".devdata"]``:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \\
        .devdata/whl/*.whl && export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 || exit
    python3 benchmarks/gpu_training_speed.py \\
        --data .devdata/cifar10_jpeg.npz --cpu-view-workers 16 --out $OUT/gpu_training_speed.json
    # lightly's batch size, and Hopper's usual settings
    python3 benchmarks/gpu_training_speed.py --data .devdata/cifar10_jpeg.npz --batch-size 128 \\
        --repeats 0 --out $OUT/gpu_training_speed_b128.json
    python3 benchmarks/gpu_training_speed.py --data .devdata/cifar10_jpeg.npz \\
        --precision bf16-mixed --channels-last --cudnn-benchmark --out $OUT/gpu_training_speed_bf16.json

A check on the CPU (tiny: a small ResNet and heads, 2 steps per epoch, a generated npz unless ``--data``):

    nice -n 19 python benchmarks/gpu_training_speed.py --smoke --cpu-view-workers 1
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ssl_lightning.cli import SSLCLI

from recipes import methods_with_recipes, recipe  # benchmarks/recipes.py, beside this script
from report import emit

ROOT = Path(__file__).resolve().parents[1]
METHODS = methods_with_recipes("ssl")  # the self-supervised methods with a recipe in configs/cifar10/
SMOKE_RESNET = '{"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64]}'
SMOKE_MODEL = [  # every recipe's method has these three arguments
    "--model.init_args.backbone_kwargs", SMOKE_RESNET,
    "--model.init_args.proj_hidden_dim", "64", "--model.init_args.proj_dim", "32",
]
LIGHTLY_SOURCE = (
    "https://docs.lightly.ai/getting_started/benchmarks.html (CIFAR-10 table); GPU from lightly's "
    "cifar10_benchmark.py docstring ('Updated: 27.03.2023'): a single NVIDIA RTX A6000. Runtimes include a kNN "
    "evaluation after every epoch; views by PIL in 8 workers"
)
LIGHTLY_MINUTES_200_EPOCHS = {  # method -> {batch size: minutes}
    "SimCLR": {128: 97.7, 512: 87.1},
    "BYOL": {128: 121.9, 512: 108.3},
    "BarlowTwins": {128: 375.9, 512: 153.3},
}


def data_paths(args: argparse.Namespace) -> dict[str, list[str]]:
    """The training data paths timed by measurement 1, as DataModule overrides; the first is measurement 2's."""
    paths = {
        # The workers only decode the split into memory at setup; training batches carry indices.
        "device_views_in_memory": [
            "--data.view_device", "device", "--data.in_memory", "true", "--data.num_workers", str(args.num_workers),
        ],
    }
    if args.compile_views:
        paths["device_views_in_memory_compiled"] = [*paths["device_views_in_memory"], "--data.compile_views", "true"]
    if args.cpu_view_workers:
        paths[f"cpu_views_{args.cpu_view_workers}_workers"] = [
            "--data.view_device", "cpu", "--data.num_workers", str(args.cpu_view_workers),
            "--data.persistent_workers", "true",
        ]
    return paths


def synced_time(device: torch.device) -> float:
    """The wall clock once the device has run everything queued on it (CUDA kernels are asynchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class EpochClock(L.Callback):
    """Synchronised clock readings at the start of training and at the end of every epoch."""

    def __init__(self) -> None:
        self.readings: list[float] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.readings.append(synced_time(pl_module.device))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.readings.append(synced_time(pl_module.device))

    @property
    def epoch_seconds(self) -> list[float]:
        return [end - start for start, end in zip(self.readings, self.readings[1:])]


class StepWindow(L.Callback):
    """Times steps warmup+1 .. warmup+timed with two synchronised readings (none in between, so the
    host keeps queueing work ahead of the GPU as in a normal run); keeps the first timed batch."""

    def __init__(self, warmup: int, timed: int) -> None:
        self.warmup, self.timed = warmup, timed
        self.steps_done = 0
        self.start: float | None = None
        self.end: float | None = None
        self.batch: dict | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.steps_done == self.warmup:
            self.batch = batch  # on the device, views drawn: what the pre-made run replays

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps_done += 1
        if self.steps_done == self.warmup:
            self.start = synced_time(pl_module.device)
        elif self.steps_done == self.warmup + self.timed:
            self.end = synced_time(pl_module.device)

    @property
    def step_seconds(self) -> float:
        if self.end is None:
            raise RuntimeError(
                f"the run ended after {self.steps_done} steps, before the timed window ({self.warmup} + {self.timed} "
                "steps) closed: lower --warmup-steps / --timed-steps (the window must fit in one epoch)"
            )
        return (self.end - self.start) / self.timed


class SameBatch(Dataset):
    """One ready batch dict, handed out `length` times (a DataLoader with batch_size=None)."""

    def __init__(self, batch: dict, length: int) -> None:
        self.batch, self.length = batch, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        return self.batch


def recipe_cli(method: str, args: argparse.Namespace, data: list[str], trainer: list[str]) -> SSLCLI:
    """The method's CIFAR-10 recipe on the npz, with this benchmark's data path and trainer overrides."""
    on_gpu = args.accelerator == "gpu"
    model = SMOKE_MODEL if args.smoke else []
    return SSLCLI(
        args=[
            "--config", str(recipe(method)),
            "--data", "NpzArrays", "--data.path", str(args.data), "--data.batch_size", str(args.batch_size),
            "--data.pin_memory", str(on_gpu).lower(), *data,
            "--model.init_args.channels_last", str(args.channels_last).lower(),
            "--model.init_args.compile", str(args.compile).lower(), *model,
            "--trainer.accelerator", args.accelerator, "--trainer.devices", "1",
            "--trainer.precision", args.precision, "--trainer.benchmark", str(args.cudnn_benchmark).lower(),
            "--trainer.default_root_dir", args.scratch,
            "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
            "--trainer.enable_checkpointing", "false", "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.callbacks", "[]", *trainer,
        ],
        run=False,
    )


def peak_gib() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def epoch_throughput(method: str, args: argparse.Namespace, data: list[str]) -> dict:
    """Measurement 1: per-epoch times of one fit, images/s and the projected 200-epoch time."""
    limit = ["--trainer.limit_train_batches", str(args.limit_train_batches)] if args.limit_train_batches else []
    cli = recipe_cli(method, args, data, ["--trainer.max_epochs", str(args.epochs), *limit])
    clock = EpochClock()
    cli.trainer.callbacks.append(clock)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    cli.trainer.fit(cli.model, cli.datamodule)
    fit_seconds = time.perf_counter() - start
    epochs, steps = clock.epoch_seconds, cli.trainer.num_training_batches
    steady = statistics.median(epochs[1:])
    images = steps * args.batch_size
    return {
        "views_on_device": cli.datamodule.views_on_device,
        "steps_per_epoch": steps,
        "epoch_seconds": [round(s, 3) for s in epochs],
        "images_per_second_steady": round(images / steady, 1),
        "images_per_second_each_steady_epoch": [round(images / s, 1) for s in epochs[1:]],
        "projected_200_epochs_minutes": round(200 * steady / 60, 2),
        "fit_seconds_incl_setup": round(fit_seconds, 1),
        # The host time the loop waited for batches (callbacks.InputWait's measure), over the whole fit.
        "input_wait_seconds": round(cli.datamodule.train_wait_seconds, 2),
        "peak_gpu_memory_gib": peak_gib(),
    }


def time_steps(
    method: str, args: argparse.Namespace, premade: dict | None, data_path: str = "device_views_in_memory"
) -> tuple[float, dict]:
    """One timed window: device views (premade None) on `data_path`, or the given pre-made batch every step."""
    steps = args.warmup_steps + args.timed_steps
    device_views = data_paths(args)[data_path]
    cli = recipe_cli(method, args, device_views, ["--trainer.max_steps", str(steps), "--trainer.max_epochs", "1"])
    window = StepWindow(args.warmup_steps, args.timed_steps)
    cli.trainer.callbacks.append(window)
    if premade is None:
        cli.trainer.fit(cli.model, cli.datamodule)
    else:
        # No DataModule: the CLI has already linked its batch size, classes, channels and image size
        # into the method, and the pre-made views need no hook.
        cli.trainer.fit(cli.model, train_dataloaders=DataLoader(SameBatch(premade, steps), batch_size=None))
    return window.step_seconds, window.batch


def views_vs_premade(method: str, args: argparse.Namespace) -> dict:
    """Measurement 2: step time with device views (eager, and compiled with --compile-views) against
    the same steps on pre-made views (the batches of the eager run)."""
    arms = {"device_views": "device_views_in_memory"}
    if args.compile_views:
        arms["device_views_compiled"] = "device_views_in_memory_compiled"
    times: dict[str, list[float]] = {name: [] for name in [*arms, "premade_views"]}
    for _ in range(args.repeats):
        for name, data_path in arms.items():
            seconds, drawn = time_steps(method, args, premade=None, data_path=data_path)
            times[name].append(seconds)
            if name == "device_views":
                batch = drawn  # what the pre-made run trains on
        times["premade_views"].append(time_steps(method, args, premade=batch)[0])
    median = {name: statistics.median(values) for name, values in times.items()}
    return {
        **{f"step_ms_{name}": round(1000 * seconds, 3) for name, seconds in median.items()},
        **{f"ratio_{name}_over_premade": round(median[name] / median["premade_views"], 4) for name in arms},
        "target_ratio_at_most": 1.05,
        "step_ms_each_repeat": {key: [round(1000 * s, 3) for s in values] for key, values in times.items()},
    }


def tiny_npz(folder: str) -> Path:
    """A CIFAR-shaped npz of random images (64 train, 16 test, 10 classes) for --smoke."""
    rng = np.random.default_rng(0)
    path = Path(folder) / "tiny.npz"
    np.savez(
        path,
        x_train=rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8), y_train=np.arange(64) % 10,
        x_test=rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8), y_test=np.arange(16) % 10,
    )
    return path


def smoke_settings(args: argparse.Namespace) -> None:
    """About a minute on a small CPU: the same code paths at tiny sizes (the figures mean nothing)."""
    args.accelerator, args.precision = "cpu", "32-true"
    args.batch_size, args.epochs, args.limit_train_batches = 8, 2, 2
    args.warmup_steps, args.timed_steps, args.repeats = 1, 2, min(args.repeats, 1)
    args.num_workers = 0
    if args.data is None:
        args.data = tiny_npz(args.scratch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None,
                        help="CIFAR-10 npz (default ../shared/data/cifar10_jpeg.npz)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--epochs", type=int, default=4, help="epochs per fit; the first is warm-up")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--precision", default="16-mixed", help="Lightning precision (recipes: 16-mixed)")
    parser.add_argument("--channels-last", action="store_true", help="channels-last convolution weights")
    parser.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark")
    parser.add_argument("--compile", action="store_true", help="torch.compile the backbone and heads")
    parser.add_argument("--compile-views", action="store_true",
                        help="also time device views with data.compile_views (both measurements)")
    parser.add_argument("--num-workers", type=int, default=8, help="workers that decode the split into memory")
    parser.add_argument("--cpu-view-workers", type=int, default=0,
                        help="also time view_device=cpu with this many DataLoader workers (0: skip)")
    parser.add_argument("--warmup-steps", type=int, default=20, help="untimed steps of each device/pre-made run")
    parser.add_argument("--timed-steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3, help="device/pre-made run pairs (0: skip measurement 2)")
    parser.add_argument("--skip-throughput", action="store_true", help="skip measurement 1 (only device vs pre-made)")
    parser.add_argument("--smoke", action="store_true", help="a tiny CPU run that checks the script end to end")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    args.accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    args.limit_train_batches = None
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: the first epoch is warm-up")
    if args.warmup_steps < 1 or args.timed_steps < 1:
        parser.error("--warmup-steps and --timed-steps must be at least 1")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # stdout carries only the JSON
    # The CLI is driven with its own argument list, beside this script's (intended here).
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")

    with tempfile.TemporaryDirectory() as scratch:
        args.scratch = scratch  # the CLI writes its config.yaml into the run's root
        if args.smoke:
            smoke_settings(args)
        elif args.accelerator != "gpu":
            parser.error("no GPU here: this benchmark measures GPU training (use --smoke to check it on a CPU)")
        args.data = args.data or ROOT.parent / "shared" / "data" / "cifar10_jpeg.npz"
        if not Path(args.data).exists():
            parser.error(f"{args.data} not found: see ../shared/data/README.md for the CIFAR-10 JPEG copy")

        results = {
            "machine": {
                "device": torch.cuda.get_device_name() if args.accelerator == "gpu" else "cpu",
                "cpu_cores": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                "lightning": L.__version__,
            },
            "settings": {
                **{key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()
                   if key != "scratch"},
                "model": "configs/cifar10/<method>.yaml: timm resnet18, CIFAR stem"
                + ("; smoke: the small ResNet and heads of SMOKE_MODEL" if args.smoke else ""),
                "training_only": "no validation, kNN, logger, progress bar or checkpoints",
            },
            "lightly_published": {"source": LIGHTLY_SOURCE, "minutes_200_epochs": LIGHTLY_MINUTES_200_EPOCHS},
            "training_speed": {},
            "device_views_vs_premade": {},
        }
        for method in args.methods:
            if not args.skip_throughput:
                results["training_speed"][method] = {
                    name: epoch_throughput(method, args, data) for name, data in data_paths(args).items()
                }
            if args.repeats:
                results["device_views_vs_premade"][method] = views_vs_premade(method, args)
            emit(results, args.out)  # after each method, so a cut-short run keeps what it measured


if __name__ == "__main__":
    main()
