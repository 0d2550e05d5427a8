"""DataModules: the batch-dict contract, properties before setup, loaders and the kNN bank,
for every kind of storage (embedded digits, npz arrays and packed JPEG, image folders)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_lightning.datamodules import STL10, Digits, ImageFolder, NpzArrays
from ssl_lightning.datamodules.digits import load_digit_splits
from ssl_lightning.datamodules.sources import channel_stats

from helpers.image_data import random_images, write_folder, write_npz_arrays, write_npz_jpeg
from helpers.paths import SHARED_DATA

# torchvision 0.29 deprecates its JPEG codec in favour of TorchCodec; the contract still names it.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")



BATCH = 4
KINDS = {
    "digits": lambda tmp: Digits(batch_size=BATCH, num_workers=0, view_device="cpu"),
    "npz_rgb": lambda tmp: NpzArrays(str(write_npz_arrays(tmp / "rgb.npz", 3)), batch_size=BATCH, num_workers=0, view_device="cpu"),
    "npz_gray": lambda tmp: NpzArrays(str(write_npz_arrays(tmp / "gray.npz", None)), batch_size=BATCH, num_workers=0, view_device="cpu"),
    "npz_jpeg": lambda tmp: NpzArrays(str(write_npz_jpeg(tmp / "jpeg.npz")), batch_size=BATCH, num_workers=0, view_device="cpu"),
    "folder_labelled": lambda tmp: ImageFolder(
        str(write_folder(tmp / "train", ["cat", "dog"])), str(write_folder(tmp / "val", ["cat", "dog"], 2)),
        image_size=16, batch_size=BATCH, num_workers=0,
    ),
    "folder_flat": lambda tmp: ImageFolder(
        str(write_folder(tmp / "train", None)), str(write_folder(tmp / "val", None, 3)),
        image_size=16, batch_size=BATCH, num_workers=0,
    ),
}
EXPECTED = {  # num_classes, in_chans, image_size
    "digits": (10, 1, 32),
    "npz_rgb": (3, 3, 16),
    "npz_gray": (3, 1, 16),
    "npz_jpeg": (4, 3, 16),
    "folder_labelled": (2, 3, 16),
    "folder_flat": (None, 3, 16),
}


@pytest.fixture(params=list(KINDS))
def kind(request, tmp_path):
    return request.param, KINDS[request.param](tmp_path)


def assert_batch_contract(batch, num_views, channels, size, batch_size):
    assert set(batch) == {"views", "label", "index"}
    assert isinstance(batch["views"], list) and len(batch["views"]) == num_views
    for view in batch["views"]:
        assert view.dtype == torch.float32 and view.shape == (batch_size, channels, size, size)
    assert batch["label"].dtype == torch.int64 and batch["label"].shape == (batch_size,)
    assert batch["index"].dtype == torch.int64 and batch["index"].shape == (batch_size,)


def test_properties_are_readable_before_setup(kind):
    name, datamodule = kind
    num_classes, in_chans, image_size = EXPECTED[name]
    assert (datamodule.num_classes, datamodule.in_chans, datamodule.image_size) == EXPECTED[name]
    assert datamodule.batch_size == BATCH and datamodule.num_views == 2
    assert isinstance(datamodule.mean, tuple) and len(datamodule.mean) == len(datamodule.std) == in_chans


def test_training_batch_follows_the_contract(kind):
    name, datamodule = kind
    assert datamodule.num_train_images is None  # known once the training split is loaded
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    assert datamodule.num_train_images == len(loader.dataset)
    batch = next(iter(loader))
    assert_batch_contract(batch, 2, datamodule.in_chans, datamodule.image_size, BATCH)
    if name == "folder_flat":
        assert (batch["label"] == -1).all()
    else:
        assert (batch["label"] >= 0).all()


def test_validation_batch_has_one_plain_view_in_order(kind):
    _, datamodule = kind
    datamodule.setup("validate")
    loader = datamodule.val_dataloader()
    batch = next(iter(loader))
    assert_batch_contract(batch, 1, datamodule.in_chans, datamodule.image_size, min(BATCH, len(loader.dataset)))
    assert batch["index"].tolist() == list(range(len(batch["index"])))


def test_knn_bank_is_the_unaugmented_training_split(kind):
    _, datamodule = kind
    datamodule.setup("fit")
    datamodule.request_knn_bank()
    val_loader, bank_loader = datamodule.val_dataloader()
    bank_batches = list(bank_loader)
    assert sum(len(batch["index"]) for batch in bank_batches) == len(datamodule.train_dataloader().dataset)
    raw = datamodule.train_dataloader().dataset.source
    mean = torch.tensor(datamodule.mean)[:, None, None]
    std = torch.tensor(datamodule.std)[:, None, None]
    for batch in bank_batches[:2]:
        for view, index, label in zip(batch["views"][0], batch["index"], batch["label"]):
            image, raw_label = raw[int(index)]
            torch.testing.assert_close(view, (image.float() / 255 - mean) / std)
            assert int(label) == raw_label


def test_val_dataloader_is_a_single_loader_without_the_bank_request():
    datamodule = Digits(batch_size=BATCH, num_workers=0, view_device="cpu")
    datamodule.setup("validate")
    assert isinstance(datamodule.val_dataloader(), torch.utils.data.DataLoader)


def test_training_loader_shuffles_and_drops_the_last_partial_batch():
    datamodule = Digits(batch_size=100, num_workers=0, views="none")
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    order = torch.cat([batch["index"] for batch in loader])
    assert len(loader) == 1437 // 100 and len(order) == 1400
    assert not torch.equal(order, torch.sort(order).values)


@pytest.mark.parametrize(("preset", "sizes"), [("simclr", [32] * 2), ("byol", [32] * 2), ("dino", [32] * 2 + [14] * 6)])
def test_training_views_follow_the_preset(preset, sizes):
    datamodule = Digits(batch_size=8, num_workers=0, view_device="cpu", views=preset)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert datamodule.num_views == len(sizes)
    assert [view.shape[-1] for view in batch["views"]] == sizes


def test_workers_produce_the_same_contract():
    datamodule = Digits(batch_size=16, num_workers=2, views="byol", view_device="cpu")
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert_batch_contract(batch, 2, 1, 32, 16)


def test_digits_are_the_stratified_80_20_split_of_upsampled_uint8_scans():
    splits = load_digit_splits()
    train, val = splits["train"], splits["val"]
    assert (len(train), len(val)) == (1437, 360)
    assert train.images.dtype == torch.uint8 and train.images.shape[1:] == (1, 32, 32)
    assert int(train.images.max()) == 255 and int(train.images.min()) == 0
    per_class = torch.bincount(torch.cat([train.labels, val.labels]))
    assert (torch.bincount(val.labels) - 0.2 * per_class).abs().max() < 1  # stratified


def test_digits_mean_and_std_are_the_training_split_pixel_statistics():
    pixels = load_digit_splits()["train"].images.double() / 255
    datamodule = Digits()
    assert datamodule.mean == pytest.approx((float(pixels.mean()),))
    assert datamodule.std == pytest.approx((float(pixels.std(unbiased=False)),))


def test_channel_stats_match_a_direct_computation_on_mixed_sizes():
    images = [torch.randint(0, 256, (3, h, h), dtype=torch.uint8) for h in (4, 7)]
    mean, std = channel_stats(image[None] for image in images)
    pixels = torch.cat([image.reshape(3, -1) for image in images], 1).double() / 255
    assert mean == pytest.approx(tuple(pixels.mean(1).tolist()))
    assert std == pytest.approx(tuple(pixels.std(1, unbiased=False).tolist()))


def test_image_folder_resizes_images_of_any_size(tmp_path):
    write_folder(tmp_path / "train", ["a"], size=24)
    Image.fromarray(random_images(1, 40, 3)[0][:, :30]).save(tmp_path / "train" / "a" / "wide.jpg")
    datamodule = ImageFolder(str(tmp_path / "train"), image_size=16, batch_size=5, num_workers=0, views="none")
    datamodule.setup("fit")
    assert next(iter(datamodule.train_dataloader()))["views"][0].shape == (5, 3, 16, 16)


def test_image_folder_without_val_dir_has_no_validation(tmp_path):
    datamodule = ImageFolder(str(write_folder(tmp_path / "train", None)), image_size=16, batch_size=2, num_workers=0)
    datamodule.setup("fit")
    assert datamodule.val_dataloader() == []


def test_stl10_trains_on_train_plus_unlabelled_with_label_minus_one_and_banks_the_labelled_split(monkeypatch):
    class FakeTorchvisionSTL10:  # the real files are 2.6 GB; this mimics torchvision's attributes
        base_folder, url = "stl10_binary", "http://example.invalid/stl10.tar.gz"

        def __init__(self, root, download, split):
            labelled = {"train": 6, "test": 5, "unlabeled": 0, "train+unlabeled": 6}[split]
            unlabelled = 4 if "unlabeled" in split else 0
            self.data = random_images(labelled + unlabelled, 8, 3).transpose(0, 3, 1, 2).copy()
            self.labels = np.concatenate([np.arange(labelled) % 10, -np.ones(unlabelled, dtype=np.int64)])

    monkeypatch.setattr(STL10, "dataset_class", FakeTorchvisionSTL10)
    datamodule = STL10(download=False, batch_size=10, num_workers=0, view_device="cpu", image_size=8)
    datamodule.setup("fit")
    datamodule.request_knn_bank()
    labels = next(iter(datamodule.train_dataloader()))["label"]
    assert sorted(labels.tolist()) == [-1] * 4 + [0, 1, 2, 3, 4, 5]
    val_loader, bank_loader = datamodule.val_dataloader()
    assert (len(val_loader.dataset), len(bank_loader.dataset)) == (5, 6)
    assert (datamodule.num_classes, datamodule.image_size, datamodule.native_image_size) == (10, 8, 96)


@pytest.mark.skipif(not (SHARED_DATA / "cifar10_jpeg.npz").is_file(), reason="shared CIFAR-10 JPEG copy absent")
def test_packed_cifar10_jpeg_copy_loads_with_its_real_statistics():
    datamodule = NpzArrays(str(SHARED_DATA / "cifar10_jpeg.npz"), batch_size=8, num_workers=0, view_device="cpu")
    assert (datamodule.num_classes, datamodule.in_chans, datamodule.image_size) == (10, 3, 32)
    assert datamodule.mean == pytest.approx((0.4914, 0.4822, 0.4465), abs=0.005)
    datamodule.setup("fit")
    assert_batch_contract(next(iter(datamodule.train_dataloader())), 2, 3, 32, 8)


@pytest.mark.parametrize("device, requested, pinned", [
    ("cuda", None, True), ("cpu", None, False), ("cuda", False, False), ("cpu", True, True),
])
def test_pin_memory_follows_the_trainer_device_unless_set(device, requested, pinned):
    data = Digits(batch_size=8, num_workers=0, pin_memory=requested)
    data.setup("validate")
    data.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)))
    assert data.val_dataloader().pin_memory is pinned
