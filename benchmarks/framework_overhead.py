"""Framework overhead: images per second of `Trainer.fit` against a bare PyTorch loop doing the
same work (the method's `shared_step`, backward, optimizer step, LR-scheduler step and, for
BYOL, the EMA update of the teacher), with the same model, views, optimizer and schedule.

    # the quickstart's backbone (steps of a few hundred ms on one CPU thread)
    nice -n 19 python benchmarks/framework_overhead.py --out benchmarks/results/framework_overhead.json
    # a tiny backbone on 16-px views (steps of ~25 ms): per-step costs show most
    nice -n 19 python benchmarks/framework_overhead.py --widths 8 16 32 64 --image-size 16 --steps 110 \
        --repeats 9 --out benchmarks/results/framework_overhead_tiny.json
    # on a GPU: ResNet-18 (CIFAR stem) on 32-px RGB views at batch 256, as the CIFAR-10 recipes
    python3 benchmarks/framework_overhead.py --device cuda --layers 2 2 2 2 --widths 64 128 256 512 \
        --in-chans 3 --batch 256 --steps 120 --warmup 20 --repeats 5 --sync-variants \
        --out $OUT/framework_overhead_gpu.json

Data loading is not measured: both loops draw the same pre-made batches (fixed random views held
in memory, handed out by a DataLoader without collation or workers). The methods are built
without classes, so neither loop has an online probe. Runs alternate (bare, Lightning, bare,
Lightning, ...) because the machine may be shared, the first `--warmup` steps of every run are not
timed, and each figure is the median over `--repeats`, by the wall clock and by this process's
CPU time (which other jobs on the machine disturb less; on a GPU only the wall clock, read after
``torch.cuda.synchronize()``, means anything). Lightning runs twice per repeat: with fair
settings (no logger, progress bar, checkpointing or model summary) and with default-like ones, as
the CLI sets them (its progress bar, ``ThrottledProgressBar``, on stderr; CSV logger every 50
steps; ``ImagesPerSecond``; model summary). With ``--sync-variants`` two more runs show what one
host read of a GPU value per step costs: the default-like run with Lightning's own
``TQDMProgressBar`` (it reads the loss after every step), and the fair run with
``on_nonfinite_loss="skip"`` (it reads the loss to decide every step).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import logging
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, Dataset

from ssl_lightning.callbacks import ImagesPerSecond, ThrottledProgressBar
from ssl_lightning.core import OptimizationConfig
from ssl_lightning.methods import BYOL, FAMILIES
from ssl_lightning.methods.ssl import SSLMethod
from ssl_lightning.optim import build_lr_scheduler, create_optimizer, param_groups

from report import emit  # benchmarks/report.py, beside this script

METHODS = FAMILIES["ssl"]  # the registry's self-supervised methods, by short name
# The quickstart's model and optimizer (configs/quickstart.yaml), heads of the same width for all;
# the backbone's widths come from --widths.
MODEL = dict(
    backbone="resnet18", cifar_stem=True, channels_last=True, in_chans=1, num_classes=None,
    proj_hidden_dim=512, proj_dim=128, optimizer="adamw", lr=2e-3, weight_decay=1e-4, lr_scaling="none",
    warmup_steps=10,
)


class PremadeBatches(Dataset):
    """`length` batch dicts cycling over a few fixed ones: views made once, on the device, unlabelled (-1)."""

    def __init__(self, length: int, batch_size: int, image_size: int, in_chans: int, device: torch.device,
                 distinct: int = 4):
        generator = torch.Generator().manual_seed(0)
        self.length = length
        shape = (batch_size, in_chans, image_size, image_size)
        self.batches = [
            {
                "views": [torch.randn(shape, generator=generator).to(device) for _ in range(2)],
                "label": torch.full((batch_size,), -1, device=device),
                "index": torch.arange(batch_size, device=device),
            }
            for _ in range(distinct)
        ]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        return self.batches[i % len(self.batches)]


def clocks(device: torch.device) -> tuple[float, float]:
    """Wall time, and this process's CPU time, which other jobs on a shared machine disturb less;
    on a GPU once it has run everything queued (kernels are asynchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter(), time.process_time()


class StepClock(L.Callback):
    """Both clocks at the end of the last warm-up step and at the end of the last step."""

    def __init__(self, warmup: int, last: int):
        self.warmup, self.last = warmup, last

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # Only two readings: a synchronised reading on every step would stall the GPU's queue.
        if batch_idx == self.warmup - 1:
            self.start = clocks(pl_module.device)
        elif batch_idx == self.last:
            self.end = clocks(pl_module.device)


def elapsed(start: tuple[float, float], end: tuple[float, float]) -> dict[str, float]:
    return {"wall": end[0] - start[0], "cpu": end[1] - start[1]}


def build(method: str, args: argparse.Namespace, variant: str = "fair") -> SSLMethod:
    torch.manual_seed(0)  # the same initial weights for every run
    extra = {"pred_hidden_dim": 512} if "pred_hidden_dim" in inspect.signature(METHODS[method]).parameters else {}
    backbone_kwargs = {"layers": args.layers, "channels": args.widths}
    return METHODS[method](**{**MODEL, "in_chans": args.in_chans}, **extra, backbone_kwargs=backbone_kwargs,
                           batch_size=args.batch, on_nonfinite_loss="skip" if variant == "skip" else "raise")


#: Lightning runs: "fair" (nothing beyond the bare loop's work), "defaults" (as the CLI sets them),
#: and with --sync-variants two that read a GPU value on the host every step: "tqdm" (the defaults
#: with Lightning's own progress bar, which reads the loss after each step) and "skip" (the fair
#: run with on_nonfinite_loss="skip", which reads the loss to decide each step).
VARIANTS = ("fair", "defaults")
SYNC_VARIANTS = ("tqdm", "skip")
LOOP_NAMES = {"fair": "lightning", "defaults": "lightning_defaults", "tqdm": "lightning_tqdm_bar",
              "skip": "lightning_skip_policy"}


def run_lightning(model: SSLMethod, loader: DataLoader, warmup: int, variant: str, log_dir: str) -> dict[str, float]:
    clock = StepClock(warmup, last=len(loader) - 1)
    device = loader.dataset.batches[0]["index"].device
    defaults = variant in ("defaults", "tqdm")
    bar = ThrottledProgressBar() if variant == "defaults" else TQDMProgressBar()
    settings = (
        dict(enable_progress_bar=True, logger=CSVLogger(log_dir), log_every_n_steps=50,
             callbacks=[clock, bar, ImagesPerSecond()])
        if defaults
        else dict(enable_progress_bar=False, logger=False, callbacks=[clock])
    )
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, max_steps=len(loader),
        enable_checkpointing=False, enable_model_summary=defaults, num_sanity_val_steps=0, **settings,
    )
    with contextlib.redirect_stdout(sys.stderr):  # the progress bar's; stdout carries the JSON
        trainer.fit(model, loader)
    return elapsed(clock.start, clock.end)


def run_bare(model: SSLMethod, loader: DataLoader, warmup: int) -> dict[str, float]:
    device = loader.dataset.batches[0]["index"].device
    model.configure_model()
    model.to(device).train()
    steps, config = len(loader), OptimizationConfig.from_hparams(model.hparams)
    # What configure_optimizers builds for one process (lr_scaling "none": the LR as given).
    optimizer = create_optimizer(
        config.optimizer, param_groups(model, config.weight_decay), lr=config.lr, weight_decay=config.weight_decay,
        momentum=config.momentum, **config.optimizer_kwargs,
    )
    scheduler = build_lr_scheduler(optimizer, config.schedule, total_steps=steps, warmup_steps=config.warmup_steps)
    for step, batch in enumerate(loader):
        loss = model.shared_step(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        if isinstance(model, BYOL):
            model.teacher.update(model._online_network(), model.teacher.momentum(step, steps))
        if step == warmup - 1:
            start = clocks(device)
    return elapsed(start, clocks(device))


def summarise(runs: dict[str, list[dict[str, float]]], timed_images: int) -> dict:
    """Median images per second per loop and clock, and Lightning's extra time per image over the bare loop."""
    rate = {
        loop: {clock: timed_images / statistics.median(run[clock] for run in samples) for clock in ("wall", "cpu")}
        for loop, samples in runs.items()
    }
    return {
        "images_per_second": {loop: {clock: round(rate[loop][clock], 1) for clock in ("wall", "cpu")} for loop in rate},
        "overhead_percent": {
            loop: {clock: round(100 * (rate["bare"][clock] / rate[loop][clock] - 1), 2) for clock in ("wall", "cpu")}
            for loop in rate if loop != "bare"
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=sorted(METHODS))
    parser.add_argument("--widths", type=int, nargs=4, default=[32, 64, 128, 256], help="ResNet stage widths")
    parser.add_argument("--layers", type=int, nargs=4, default=[1, 1, 1, 1], help="ResNet blocks per stage")
    parser.add_argument("--in-chans", type=int, default=1, help="view channels (the quickstart's digits: 1)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=40, help="steps per run, warm-up included")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps at the start of every run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sync-variants", action="store_true",
                        help="also time Lightning's own progress bar and the skip NaN policy (a host read per step)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # stdout carries only the JSON
    device = torch.device(args.device)
    loader = DataLoader(PremadeBatches(args.steps, args.batch, args.image_size, args.in_chans, device), batch_size=None)
    variants = VARIANTS + (SYNC_VARIANTS if args.sync_variants else ())
    loops = ["bare", *(LOOP_NAMES[variant] for variant in variants)]
    runs = {method: {loop: [] for loop in loops} for method in args.methods}
    with tempfile.TemporaryDirectory() as log_dir:
        for _ in range(args.repeats):
            for method in args.methods:
                runs[method]["bare"].append(run_bare(build(method, args), loader, args.warmup))
                for variant in variants:
                    runs[method][LOOP_NAMES[variant]].append(
                        run_lightning(build(method, args, variant), loader, args.warmup, variant, log_dir)
                    )

    timed_images = (args.steps - args.warmup) * args.batch
    results = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__,
                    "lightning": L.__version__, "threads": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
        "settings": {**vars(args), "out": str(args.out), "data": "pre-made views in memory, no workers, no labels",
                     "images_per_step": args.batch, "views_per_image": 2},
        **{method: summarise(method_runs, timed_images) for method, method_runs in runs.items()},
        "seconds_per_run": runs,
    }
    emit(results, args.out)


if __name__ == "__main__":
    main()
