"""Where training views are drawn (`view_device: auto`) and the in-memory dataset mode."""

import pytest
import torch

from ssl_lightning.datamodules import Digits, ImageFolder
from ssl_lightning.datamodules.device_batches import BATCHED_MEASURED_FASTER_UP_TO, IndexItems, resolve_view_device

from helpers.image_data import write_folder
from helpers.views import first_training_batch


@pytest.mark.parametrize(
    "requested,augments,one_size,size,device,expected",
    [
        ("cpu", True, True, 32, "cuda", "cpu"),  # explicit choices pass through
        ("device", False, False, 512, "cpu", "device"),
        ("auto", True, True, 32, "cpu", "device"),
        ("auto", True, True, BATCHED_MEASURED_FASTER_UP_TO, "cpu", "device"),
        ("auto", True, True, BATCHED_MEASURED_FASTER_UP_TO + 1, "cpu", "cpu"),  # beyond what was measured
        ("auto", True, True, 512, "cuda", "device"),
        ("auto", False, True, 32, "cuda", "cpu"),  # nothing to batch in a plain resize
        ("auto", True, False, 32, "cuda", "cpu"),  # varied sizes would be centre-cropped before the crop
    ],
)
def test_auto_view_device_rule(requested, augments, one_size, size, device, expected):
    assert resolve_view_device(requested, augments, one_size, size, device) == expected


def resolved(datamodule) -> bool:
    datamodule.setup("fit")
    return datamodule.views_on_device


def test_auto_batches_views_of_one_size_datasets_and_keeps_files_and_plain_views_per_image(tmp_path):
    assert resolved(Digits(batch_size=8, num_workers=0))
    assert not resolved(Digits(batch_size=8, num_workers=0, views="none"))
    folder = write_folder(tmp_path / "train", ["a", "b"])
    assert not resolved(ImageFolder(str(folder), image_size=16, batch_size=2, num_workers=0))


def test_in_memory_needs_device_views_and_says_how_to_fix_it():
    with pytest.raises(ValueError, match="set view_device to 'device' or 'auto', or in_memory=False"):
        Digits(in_memory=True, view_device="cpu")
    with pytest.raises(ValueError, match="view_device='auto' chose the CPU path for Digits"):
        Digits(batch_size=8, num_workers=0, in_memory=True, views="none").setup("fit")


def test_in_memory_batches_carry_indices_and_get_the_same_views_as_loaded_images():
    loader, in_memory = first_training_batch(in_memory=True)
    assert isinstance(loader.dataset, IndexItems) and loader.num_workers == 0  # no pixels, no workers
    _, loaded = first_training_batch()
    assert set(in_memory) == set(loaded) == {"views", "label", "index"}
    assert torch.equal(in_memory["index"], loaded["index"]) and torch.equal(in_memory["label"], loaded["label"])
    for a, b in zip(in_memory["views"], loaded["views"]):
        assert torch.equal(a, b)
