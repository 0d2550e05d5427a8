"""Bad input gets an error that says what is wrong and how to fix it (messages are asserted)."""

import re

import numpy as np
import pytest
from PIL import Image

from ssl_lightning.datamodules import CIFAR10, CIFAR100, STL10, Digits, ImageFolder, NpzArrays
from ssl_lightning.datamodules.image_files import FileImages, list_image_folder


def write_pngs(folder, count, size=8):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(np.full((size, size, 3), 10 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


@pytest.mark.parametrize(
    ("datamodule_class", "folder"),
    [(CIFAR10, "cifar-10-batches-py"), (CIFAR100, "cifar-100-python"), (STL10, "stl10_binary")],
)
def test_missing_torchvision_files_without_download_name_the_path_and_the_remedy(tmp_path, datamodule_class, folder):
    datamodule = datamodule_class(data_dir=str(tmp_path), download=False, num_workers=0)
    datamodule.prepare_data()  # download=False: nothing to fetch, nothing to fail yet
    name = datamodule_class.dataset_class.__name__
    expected = f"{re.escape(str(tmp_path / folder))}.*download=True.*torchvision.datasets.{name}"
    with pytest.raises(FileNotFoundError, match=expected):
        datamodule.setup("fit")


def test_torchvision_properties_need_no_files(tmp_path):
    datamodule = CIFAR100(data_dir=str(tmp_path / "absent"), download=False, views="dino")
    assert (datamodule.num_classes, datamodule.in_chans, datamodule.image_size, datamodule.num_views) == (100, 3, 32, 8)


def test_non_image_file_in_a_folder_is_named(tmp_path):
    train = write_pngs(tmp_path / "train" / "cat", 3)
    (train / "notes.txt").write_text("not an image")
    datamodule = ImageFolder(str(tmp_path / "train"), image_size=8, batch_size=2, num_workers=0)
    with pytest.raises(ValueError, match=r"cannot read .*notes\.txt as an image.*skip_corrupt=True"):
        datamodule.setup("fit")


def test_skip_corrupt_warns_once_listing_the_skipped_files_and_trains_on(tmp_path):
    train = write_pngs(tmp_path / "train", 4)
    (train / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    (train / "empty.png").write_bytes(b"")
    datamodule = ImageFolder(str(train), image_size=8, batch_size=2, num_workers=0, skip_corrupt=True)
    with pytest.warns(UserWarning, match=r"skipping 2 unreadable file\(s\): .*broken\.jpg, .*empty\.png") as record:
        datamodule.setup("fit")
    assert len([w for w in record if "unreadable" in str(w.message)]) == 1
    assert len(datamodule.train_dataloader().dataset) == 4
    assert len(list(datamodule.train_dataloader())) == 2


def test_file_broken_after_its_header_is_named_when_decoded(tmp_path):
    path = write_pngs(tmp_path / "train", 1, size=64) / "0.png"
    path.write_bytes(path.read_bytes()[:60])  # header intact, pixel data cut
    images = FileImages(list_image_folder(tmp_path / "train"), in_chans=3)
    with pytest.raises(OSError, match=r"cannot decode image .*0\.png"):
        images[0]


def test_empty_image_folder_is_a_clear_error(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"image folder .*train is empty"):
        ImageFolder(str(tmp_path / "train"), image_size=8).setup("fit")


def test_missing_image_folder_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"image folder not found: .*nowhere"):
        ImageFolder(str(tmp_path / "nowhere")).num_classes


def test_folder_mixing_class_folders_and_loose_files_is_refused(tmp_path):
    write_pngs(tmp_path / "train" / "cat", 1)
    write_pngs(tmp_path / "train", 1)
    with pytest.raises(ValueError, match=r"mixes class folders \['cat'\] with loose files \['0.png'\]"):
        ImageFolder(str(tmp_path / "train")).num_classes


def test_validation_class_unknown_to_training_is_named(tmp_path):
    write_pngs(tmp_path / "train" / "cat", 2)
    write_pngs(tmp_path / "val" / "dog", 2)
    datamodule = ImageFolder(str(tmp_path / "train"), str(tmp_path / "val"), image_size=8, batch_size=2, num_workers=0)
    with pytest.raises(ValueError, match=r"class folders \['dog'\] that the training folder lacks"):
        datamodule.setup("fit")


def test_empty_npz_train_split_is_a_clear_error(tmp_path):
    empty = np.zeros((0, 8, 8, 3), np.uint8)
    np.savez(tmp_path / "d.npz", x_train=empty, y_train=np.zeros(0), x_test=empty, y_test=np.zeros(0))
    with pytest.raises(ValueError, match="train split is empty"):
        NpzArrays(str(tmp_path / "d.npz")).setup("fit")


def test_batch_larger_than_the_training_set_with_drop_last_names_both_numbers():
    with pytest.raises(ValueError, match=r"batch_size=2000 is larger than the 1437 training images.*drop_last"):
        Digits(batch_size=2000, num_workers=0).setup("fit")
    Digits(batch_size=2000, num_workers=0, drop_last=False).setup("fit")


def test_unknown_preset_is_refused_at_construction_listing_valid_presets():
    with pytest.raises(ValueError, match="valid presets: simclr, byol, dino, supervised, none"):
        Digits(views="mocov3")


def test_npz_missing_keys_are_named_with_the_expected_ones(tmp_path):
    images = np.zeros((4, 8, 8), np.uint8)
    np.savez(tmp_path / "d.npz", x_train=images, y_train=np.zeros(4), x_test=images)
    with pytest.raises(ValueError, match=r"lacks keys \['y_test'\].*expects x_train, y_train, x_test, y_test"):
        NpzArrays(str(tmp_path / "d.npz")).in_chans


def test_npz_of_neither_layout_names_both_key_sets(tmp_path):
    np.savez(tmp_path / "d.npz", images=np.zeros((4, 8, 8), np.uint8))
    with pytest.raises(ValueError, match=r"neither npz layout.*x_train, y_train.*train_jpeg, train_offsets"):
        NpzArrays(str(tmp_path / "d.npz")).in_chans


def test_npz_images_must_be_uint8(tmp_path):
    images = np.zeros((4, 8, 8, 3), np.float32)
    np.savez(tmp_path / "d.npz", x_train=images, y_train=np.zeros(4), x_test=images, y_test=np.zeros(4))
    with pytest.raises(ValueError, match=r"x_train must be uint8"):
        NpzArrays(str(tmp_path / "d.npz")).in_chans


def test_missing_npz_file_names_the_path_and_the_layouts(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"npz file not found: .*absent\.npz.*x_train=.*train_jpeg"):
        NpzArrays(str(tmp_path / "absent.npz")).mean


def test_dataloader_before_setup_says_to_run_setup():
    with pytest.raises(RuntimeError, match=r"setup\('fit'\) must run before the train dataloader"):
        Digits(num_workers=0).train_dataloader()
