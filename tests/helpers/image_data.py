"""Small image datasets written to disk in each storage a DataModule reads: npz arrays, packed JPEG, folders."""

import numpy as np
import torch
from PIL import Image
from torchvision.io import encode_jpeg


def random_images(count, size, channels, seed=0):
    shape = (count, size, size, channels) if channels else (count, size, size)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def write_npz_arrays(path, channels, size=16, count=12):
    np.savez(
        path,
        x_train=random_images(count, size, channels),
        y_train=np.arange(count) % 3,
        x_test=random_images(6, size, channels, seed=1),
        y_test=np.arange(6) % 3,
    )
    return path


def write_npz_jpeg(path, size=16, count=12):
    arrays = {}
    for split, n in (("train", count), ("test", 6)):
        encoded = [encode_jpeg(torch.from_numpy(image).permute(2, 0, 1)) for image in random_images(n, size, 3)]
        arrays[f"{split}_jpeg"] = torch.cat(encoded).numpy()
        arrays[f"{split}_offsets"] = np.cumsum([0] + [len(data) for data in encoded])
        arrays[f"{split}_labels"] = np.arange(n) % 4
    np.savez(path, classes=np.array(["a", "b", "c", "d"]), **arrays)
    return path


def write_folder(root, classes, per_class=4, size=16):
    for c, name in enumerate(classes or [None]):
        folder = root / name if name else root
        folder.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(random_images(per_class, size, 3, seed=c)):
            Image.fromarray(image).save(folder / f"{i}.png")
    return root


def write_truncated_jpeg(path, size=64):
    """A JPEG cut in half: its header is whole (PIL opens it, the size is known) but its pixels do not decode."""
    encoded = encode_jpeg(torch.from_numpy(random_images(1, size, 3)[0]).permute(2, 0, 1)).numpy().tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encoded[: len(encoded) // 2])
    return path
