"""Bad input gets an error that says what is wrong and how to fix it (messages are asserted)."""

import re

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_lightning.datamodules import CIFAR10, CIFAR100, STL10, Digits, ImageFolder, NpzArrays, ViewDataModule
from ssl_lightning.datamodules.image_files import FileImages, list_image_folder
from ssl_lightning.datamodules.sources import TensorImages

from helpers.image_data import random_images, write_folder, write_truncated_jpeg


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


def write_labelled_npz(path, labels, classes):
    images = random_images(len(labels), 8, 3)
    np.savez(path, x_train=images, y_train=np.array(labels), x_test=images[:2], y_test=np.array(labels[:2]),
             classes=np.array(classes))
    return path


def test_npz_labels_beyond_its_classes_are_refused_at_setup_naming_file_label_and_count(tmp_path):
    path = write_labelled_npz(tmp_path / "d.npz", labels=[0, 1, 2, 3, 4], classes=["a", "b"])
    datamodule = NpzArrays(str(path), batch_size=2, num_workers=0)
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}.*holds label 4 but num_classes is 2"):
        datamodule.setup("fit")


def test_npz_labels_below_minus_one_are_refused(tmp_path):
    path = write_labelled_npz(tmp_path / "d.npz", labels=[0, 1, -3, 1], classes=["a", "b"])
    with pytest.raises(ValueError, match=r"holds label -3.*-1 for unlabelled"):
        NpzArrays(str(path), batch_size=2, num_workers=0).setup("fit")


def test_unlabelled_images_pass_the_label_check(tmp_path):
    path = write_labelled_npz(tmp_path / "d.npz", labels=[-1, 0, 1, -1], classes=["a", "b"])
    datamodule = NpzArrays(str(path), batch_size=2, num_workers=0)
    datamodule.setup("fit")
    assert datamodule.num_classes == 2 and len(datamodule.train_dataloader().dataset) == 4


class TwoClassesHoldingLabelTwo(ViewDataModule):
    """Any DataModule that states num_classes: the check lives in ViewDataModule's setup."""

    num_classes, in_chans, native_image_size, mean, std = 2, 1, 8, (0.5,), (0.5,)

    def _load_images(self, split):
        return TensorImages(torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.tensor([0, 1, 2, 1]), origin="here")


def test_every_datamodule_checks_its_labels_against_num_classes_at_setup():
    expected = r"TwoClassesHoldingLabelTwo train split \(here\) holds label 2 but num_classes is 2"
    with pytest.raises(ValueError, match=expected):
        TwoClassesHoldingLabelTwo(batch_size=2, num_workers=0).setup("fit")


def test_skip_corrupt_decodes_every_file_and_skips_a_truncated_jpeg(tmp_path):
    train = write_folder(tmp_path / "train", ["a"], per_class=4, size=8)
    write_truncated_jpeg(train / "a" / "cut.jpg")
    datamodule = ImageFolder(str(train), image_size=8, batch_size=2, num_workers=0, skip_corrupt=True,
                             mean=(0.5,) * 3, std=(0.5,) * 3)
    with pytest.warns(UserWarning, match=r"skipping 1 unreadable file\(s\).*cut\.jpg.*truncated"):
        datamodule.setup("fit")
    assert len(datamodule.train_dataloader().dataset) == 4


def test_skip_corrupt_warning_names_the_first_few_files_and_counts_the_rest(tmp_path):
    train = write_folder(tmp_path / "train", None, per_class=2, size=8)
    for i in range(7):
        (train / f"broken{i}.jpg").write_bytes(b"not a jpeg")
    datamodule = ImageFolder(str(train), image_size=8, batch_size=2, num_workers=0, skip_corrupt=True)
    with pytest.warns(UserWarning, match=r"skipping 7 unreadable file\(s\).*broken4\.jpg and 2 more") as record:
        datamodule.setup("fit")
    assert "broken5" not in str(record[0].message)


def test_truncated_jpeg_without_skip_corrupt_fails_in_the_worker_naming_the_file_and_the_remedy(tmp_path):
    train = write_folder(tmp_path / "train", ["a"], per_class=2, size=8)
    write_truncated_jpeg(train / "a" / "cut.jpg")
    datamodule = ImageFolder(str(train), image_size=8, batch_size=3, num_workers=1, drop_last=False,
                             persistent_workers=False, mean=(0.5,) * 3, std=(0.5,) * 3)
    datamodule.setup("fit")  # headers only, by design: a full decode at setup is the skip_corrupt option
    with pytest.raises(OSError, match=r"cannot decode image .*cut\.jpg.*skip_corrupt=True"):
        list(datamodule.train_dataloader())
