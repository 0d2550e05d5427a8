"""How far device-side views are from torchvision's CPU pipeline for identical random parameters.

Measures, in uint8 levels (0..255), the max and mean absolute pixel difference of:
- crop + resize: `crop_resize` (bilinear grid sampling) vs `resized_crop(antialias=False)` (should
  be ~0) and vs `resized_crop(antialias=True)` (the CPU pipeline; differs when a crop is shrunk);
- colour jitter (brightness, contrast, saturation, hue in a random order, the SimCLR strengths)
  in float32 on [0, 1] vs torchvision on uint8, which rounds to integers after every op.

Images: CIFAR-10 test images (JPEG copy, ../shared/data/cifar10_jpeg.npz) when present, else
random uint8 pixels (stated in the output). 96-px views are cut from the images upsampled to 160 px,
so that most crops are shrunk, as on STL-10/ImageNet-sized data.

    python benchmarks/device_views_fidelity.py --out benchmarks/results/device_views_fidelity.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torchvision.io import decode_jpeg
from torchvision.transforms.v2 import functional as TF

from ssl_lightning.datamodules import device_views as dv
from ssl_lightning.datamodules.device_params import sample_crop_boxes, sample_jitter

from report import emit  # benchmarks/report.py, beside this script

CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10_jpeg.npz"


def load_images(count: int) -> tuple[torch.Tensor, str]:
    if not CIFAR.exists():
        return torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8), "random uint8 pixels"
    with np.load(CIFAR) as npz:
        data, offsets = torch.from_numpy(npz["test_jpeg"]), npz["test_offsets"]
        images = [decode_jpeg(data[offsets[i] : offsets[i + 1]]) for i in range(count)]
    return torch.stack(images), f"first {count} CIFAR-10 test images (JPEG copy)"


def stats(ours: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    difference = (ours.float() - reference.float()).abs() * 255
    return {"max": round(difference.max().item(), 3), "mean": round(difference.mean().item(), 4)}


def crop_differences(pixels: torch.Tensor, size: int, generator: torch.Generator) -> dict[str, dict]:
    n, _, height, width = pixels.shape
    boxes = sample_crop_boxes(n, height, width, (0.08, 1.0), generator=generator)
    ours = dv.crop_resize(pixels, boxes, size)
    plain, antialiased = [], []
    for image, (top, left, h, w) in zip(pixels, boxes.int().tolist()):
        plain.append(TF.resized_crop(image, top, left, h, w, [size, size], antialias=False))
        antialiased.append(TF.resized_crop(image, top, left, h, w, [size, size], antialias=True))
    return {
        "vs_antialias_false": stats(ours, torch.stack(plain)),
        "vs_antialias_true": stats(ours, torch.stack(antialiased)),
    }


def jitter_rounding_difference(images: torch.Tensor, generator: torch.Generator) -> dict[str, float]:
    factors, order = sample_jitter(len(images), 0.4, 0.4, 0.4, 0.1, generator=generator)
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    reference = []
    for image, f, o in zip(images, factors, order):
        for op in o.tolist():
            image = ops[op](image, float(f[op]))
        reference.append(image)
    ours = dv.color_jitter(images.float() / 255, factors, order, blend=False)
    return stats(ours, torch.stack(reference).float() / 255)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(0)
    images, source = load_images(args.images)
    pixels = images.float() / 255
    large = TF.resize(pixels, [160, 160], antialias=True)
    results = {
        "images": source,
        "unit": "uint8 levels (0..255)",
        "crop_resize_32px_from_32px": crop_differences(pixels, 32, generator),
        "crop_resize_96px_from_160px": crop_differences(large, 96, generator),
        "jitter_float_vs_uint8_rounding": jitter_rounding_difference(images, generator),
    }
    emit(results, args.out)


if __name__ == "__main__":
    main()
