"""Views per second of the SimCLR recipe (RGB, two views) at 32 and 96 px: device-side batched
views (`DeviceViews`, here on whatever device is given) vs the per-image torchvision v2 pipeline
the DataLoader workers run (`MultiViewTransform`, one thread, i.e. one worker's rate), and kornia's
batched augmentations when kornia is installed (it is not a dependency; skipped otherwise).

    nice -n 19 python benchmarks/views_throughput.py --out benchmarks/results/views_throughput.json

Inputs are random uint8 RGB images at the view size (the device path's fixed-size batch). Each
figure is the best of `--repeats` timed runs after one warm-up run.

With `--loader-workers K`, each size also gets `torchvision_dataloader_K_workers`: the per-image
pipeline measured through a real training DataLoader, the one `view_device="cpu"` trains with (a
`ViewDataModule`'s seeded sampler, seeded RNG per item, K persistent worker processes, collation
of batches of `--batch` images into the main process, pinned memory with `--device cuda`). Its
images are random uint8 images held in memory (no decoding, so it is the augmentation pipeline's
own rate, the CPU path's best case); `--loader-warmup` batches are taken before `--loader-batches`
timed ones, so worker start-up and the initially filled prefetch queue stay out of the figure.
Views per second like the other rows (two views per image: images/s is half).

`--compile` adds `device_views_compiled_T_threads`: `DeviceViews(compile=True)` (what
`data.compile_views` selects), timed after a warm-up call that compiles.

On the GPU machine (16 cores), for the issue's "10x a 16-worker pipeline", from the repository root:

    PYTHONPATH=. python3 benchmarks/views_throughput.py --device cuda --compile --loader-workers 16 \\
        --out $OUT/views_throughput_gpu.json
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import time
from pathlib import Path

import torch

from ssl_lightning.datamodules import ViewDataModule
from ssl_lightning.datamodules.device_views import DeviceViews
from ssl_lightning.datamodules.sources import TensorImages
from ssl_lightning.datamodules.views import (
    MIN_SIZE_FOR_BLUR,
    MultiViewTransform,
    blur_kernel_size,
    resolve_views,
)

from report import emit  # benchmarks/report.py, beside this script

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def best_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def per_image_views_per_second(size: int, images: torch.Tensor, repeats: int) -> float:
    transform = MultiViewTransform(resolve_views("simclr", size, 3), MEAN, STD)
    seconds = best_seconds(lambda: [transform(image) for image in images], repeats)
    return 2 * len(images) / seconds


def device_views_per_second(
    size: int, images: torch.Tensor, repeats: int, device: torch.device, compile: bool = False
) -> float:
    views = DeviceViews(resolve_views("simclr", size, 3), MEAN, STD, compile=compile).to(device)
    batch = images.to(device)

    def run() -> None:
        views(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return 2 * len(images) / best_seconds(run, repeats)


class CycledImages(TensorImages):
    """`length` items cycling over a pool of images: a long epoch without holding every image."""

    def __init__(self, pool: torch.Tensor, length: int) -> None:
        super().__init__(pool, torch.full((len(pool),), -1))
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return super().__getitem__(index % len(self.images))


class RandomImagesData(ViewDataModule):
    """The SimCLR recipe's training loader on the CPU path, over random images in memory."""

    num_classes, in_chans, mean, std = None, 3, MEAN, STD

    def __init__(self, images: CycledImages, **kwargs) -> None:
        super().__init__(views="simclr", view_device="cpu", seed=0, **kwargs)
        self.images = images

    @property
    def native_image_size(self) -> int:
        return self.images.images.shape[-1]

    def _load_images(self, split: str) -> CycledImages | None:
        return self.images if split == "train" else None


def dataloader_views_per_second(pool: torch.Tensor, args: argparse.Namespace, pin_memory: bool) -> float:
    batches = args.loader_warmup + args.loader_batches
    data = RandomImagesData(
        CycledImages(pool, batches * args.batch), batch_size=args.batch, num_workers=args.loader_workers,
        pin_memory=pin_memory, persistent_workers=True,
    )
    data.setup("fit")
    loader = iter(data.train_dataloader())
    for _ in range(args.loader_warmup):
        next(loader)
    start = time.perf_counter()
    for _ in range(args.loader_batches):
        next(loader)
    return 2 * args.loader_batches * args.batch / (time.perf_counter() - start)


def kornia_views_per_second(size: int, images: torch.Tensor, repeats: int, device: torch.device) -> float:
    import kornia.augmentation as K

    kernel = blur_kernel_size(size)
    blur = [K.RandomGaussianBlur((kernel, kernel), (0.1, 2.0), p=0.5)] if size >= MIN_SIZE_FOR_BLUR else []
    pipeline = torch.nn.Sequential(
        K.RandomResizedCrop((size, size), scale=(0.08, 1.0)),
        K.RandomHorizontalFlip(),
        K.ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8),
        K.RandomGrayscale(p=0.2),
        *blur,
        K.Normalize(torch.tensor(MEAN), torch.tensor(STD)),
    ).to(device)
    batch = images.to(device)

    def run() -> None:
        pixels = batch.float() / 255
        pipeline(pixels), pipeline(pixels)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return 2 * len(images) / best_seconds(run, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 96])
    parser.add_argument("--batch", type=int, default=256, help="images per device-side batch")
    parser.add_argument("--per-image", type=int, default=256, help="images timed through the CPU pipeline")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for the batched paths")
    parser.add_argument("--compile", action="store_true", help="also time DeviceViews(compile=True)")
    parser.add_argument("--loader-workers", type=int, default=0,
                        help="also time the per-image pipeline through a DataLoader with this many workers (0: skip)")
    parser.add_argument("--loader-warmup", type=int, default=40, help="untimed DataLoader batches")
    parser.add_argument("--loader-batches", type=int, default=80, help="timed DataLoader batches")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    device = torch.device(args.device)
    batched_threads = args.threads or torch.get_num_threads()
    has_kornia = importlib.util.find_spec("kornia") is not None
    results = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__,
                    "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"},
        "settings": {**vars(args), "out": str(args.out), "batched_threads": batched_threads},
        "kornia": "installed" if has_kornia else "not installed: skipped",
        "views_per_second": {},
    }
    generator = torch.Generator().manual_seed(0)
    for size in args.sizes:
        images = torch.randint(0, 256, (args.batch, 3, size, size), dtype=torch.uint8, generator=generator)
        torch.set_num_threads(1)  # one DataLoader worker's rate
        per_image = per_image_views_per_second(size, images[: args.per_image], args.repeats)
        row = {"torchvision_per_image_1_thread": per_image}
        row["device_views_batched_1_thread"] = device_views_per_second(size, images, args.repeats, device)
        torch.set_num_threads(batched_threads)
        row[f"device_views_batched_{batched_threads}_threads"] = device_views_per_second(
            size, images, args.repeats, device
        )
        if args.compile:  # timed after the warm-up call, which compiles
            row[f"device_views_compiled_{batched_threads}_threads"] = device_views_per_second(
                size, images, args.repeats, device, compile=True
            )
        if has_kornia:
            row["kornia_batched"] = kornia_views_per_second(size, images, args.repeats, device)
        if args.loader_workers:
            row[f"torchvision_dataloader_{args.loader_workers}_workers"] = dataloader_views_per_second(
                images, args, pin_memory=device.type == "cuda"
            )
        results["views_per_second"][f"{size}px"] = {name: round(value, 1) for name, value in row.items()}

    emit(results, args.out)


if __name__ == "__main__":
    main()
