"""``label_fraction``: a stratified, seeded share of the training labels; the rest read as -1."""

import json

import pytest
import torch

from ssl_lightning.datamodules import Digits
from ssl_lightning.datamodules.label_fraction import labelled_subset

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


def _labels_on_this_rank():
    return train_labels(0.1, seed=7)


@pytest.mark.ddp
@pytest.mark.timeout(120)
def test_every_rank_keeps_the_same_labels(tmp_path):
    first, second = run_on_two_ranks(_labels_on_this_rank, tmp_path)
    assert torch.equal(first, second)
    assert (first >= 0).sum() < len(first)
