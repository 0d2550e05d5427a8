"""``label_fraction``: a stratified, seeded share of the training labels; the rest read as -1, or are
left out of training with ``unlabelled: drop``."""

import json

import pytest
import torch

from ssl_lightning.datamodules import Digits
from ssl_lightning.datamodules.label_fraction import LabelledImages, labelled_subset
from ssl_lightning.datamodules.sources import TensorImages

from helpers.gloo import run_on_two_ranks

#: 10 classes of unequal size: 20, 21, ..., 29 images
LABELS = torch.cat([torch.full((20 + cls,), cls) for cls in range(10)])[torch.randperm(245, generator=torch.Generator().manual_seed(1))]


def train_labels(fraction, seed=0, trainer=None) -> torch.Tensor:
    data = Digits(batch_size=16, num_workers=0, views="supervised", label_fraction=fraction, label_fraction_seed=seed)
    data.trainer = trainer
    data.setup("fit")
    return torch.as_tensor(data._datasets["train"].source.labels)


def test_every_class_keeps_its_rounded_share_and_nothing_else():
    kept = labelled_subset(LABELS, 0.1, seed=0)
    for cls in range(10):
        assert (LABELS[kept] == cls).sum() == round(0.1 * (20 + cls))
    assert kept.unique().numel() == kept.numel()


def test_the_subset_depends_on_the_seed_alone_and_leaves_the_global_rng_alone():
    torch.manual_seed(5)
    expected_next = torch.rand(3)
    torch.manual_seed(5)
    first = labelled_subset(LABELS, 0.2, seed=3)
    assert torch.equal(torch.rand(3), expected_next)
    assert torch.equal(labelled_subset(LABELS, 0.2, seed=3), first)
    assert not torch.equal(labelled_subset(LABELS, 0.2, seed=4), first)


def test_unlabelled_images_are_never_picked():
    labels = LABELS.clone()
    labels[:100] = -1
    kept = labelled_subset(labels, 1.0, seed=0)
    assert torch.equal(kept, (labels >= 0).nonzero().flatten())


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_a_fraction_outside_zero_to_one_is_refused(fraction):
    with pytest.raises(ValueError, match=r"label_fraction must be in \(0, 1\]"):
        labelled_subset(LABELS, fraction, seed=0)
    with pytest.raises(ValueError, match=r"label_fraction must be in \(0, 1\]"):
        Digits(label_fraction=fraction)


def test_a_fraction_that_leaves_a_class_without_labels_names_the_class():
    with pytest.raises(ValueError, match=r"keeps no labelled image of class 0, which has 20 image\(s\); use label_fraction >= 0.025"):
        labelled_subset(LABELS, 0.02, seed=0)


def test_the_datamodule_hides_the_other_labels_in_its_batches_and_records_the_subset(tmp_path):
    import lightning as L

    trainer = L.Trainer(default_root_dir=tmp_path, logger=False, accelerator="cpu")
    everything = train_labels(None)
    partial = train_labels(0.1, trainer=trainer)
    labelled = partial >= 0
    assert torch.equal(partial[labelled], everything[labelled])
    assert labelled.sum() == sum(round(0.1 * int((everything == cls).sum())) for cls in range(10))
    record = json.loads((tmp_path / "labelled_subset.json").read_text())
    assert record["indices"] == labelled.nonzero().flatten().tolist()
    assert (record["label_fraction"], record["seed"]) == (0.1, 0)

    data = Digits(batch_size=1437, num_workers=0, views="supervised", label_fraction=0.1, drop_last=False)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert torch.equal(batch["label"], partial[batch["index"]])


# ---------------------------------------------------------------- unlabelled: drop


def dropping(fraction=0.1, seed=0, trainer=None) -> Digits:
    data = Digits(batch_size=16, num_workers=0, views="supervised", label_fraction=fraction, label_fraction_seed=seed,
                  unlabelled="drop")
    data.trainer = trainer
    data.setup("fit")
    return data


def test_drop_trains_on_exactly_the_recorded_stratified_subset_and_leaves_validation_alone(tmp_path):
    import lightning as L

    data = dropping(trainer=L.Trainer(default_root_dir=tmp_path, logger=False, accelerator="cpu"))
    everything = Digits(batch_size=16, num_workers=0, views="supervised")
    everything.setup("fit")
    all_labels = torch.as_tensor(everything.raw_images("train").labels)
    train = data._datasets["train"].source
    expected = labelled_subset(all_labels, 0.1, seed=0)
    assert isinstance(train, LabelledImages) and torch.equal(train.kept, expected)
    assert json.loads((tmp_path / "labelled_subset.json").read_text())["indices"] == expected.tolist()
    assert torch.equal(torch.as_tensor(train.labels), all_labels[expected])  # stratified: 10% of each class
    assert torch.bincount(torch.as_tensor(train.labels)).tolist() == [
        round(0.1 * int((all_labels == cls).sum())) for cls in range(10)]
    raw = everything.raw_images("train")
    for position in (0, len(expected) // 2, len(expected) - 1):
        image, label = train[position]
        assert torch.equal(image, raw[int(expected[position])][0]) and label == int(all_labels[expected[position]])
    assert data.num_train_images == len(expected) == 142
    assert len(data._datasets["val"]) == len(everything._datasets["val"])  # validation untouched
    batch = next(iter(data.train_dataloader()))
    assert bool((batch["label"] >= 0).all())


def test_drop_without_a_fraction_leaves_out_the_images_stored_unlabelled():
    images = torch.arange(5, dtype=torch.uint8).view(5, 1, 1, 1).expand(5, 1, 2, 2)
    kept = LabelledImages(TensorImages(images, torch.tensor([3, -1, 0, -1, 1])))
    assert len(kept) == 3 and kept.labels.tolist() == [3, 0, 1]
    assert [int(kept[i][0][0, 0, 0]) for i in range(3)] == [0, 2, 4] and kept[1][1] == 0
    with pytest.raises(ValueError, match="has no labelled image to keep"):
        LabelledImages(TensorImages(images, torch.full((5,), -1)))
    with pytest.raises(ValueError, match="unlabelled must be 'keep' .* or 'drop' .*, got 'skip'"):
        Digits(unlabelled="skip")


def _labels_on_this_rank():
    return train_labels(0.1, seed=7), dropping(0.1, seed=7)._datasets["train"].source.kept


@pytest.mark.ddp
@pytest.mark.timeout(120)
def test_every_rank_keeps_the_same_labels(tmp_path):
    (first, first_kept), (second, second_kept) = run_on_two_ranks(_labels_on_this_rank, tmp_path)
    assert torch.equal(first, second)
    assert (first >= 0).sum() < len(first)
    assert torch.equal(first_kept, second_kept) and torch.equal(first_kept, (first >= 0).nonzero().flatten())
