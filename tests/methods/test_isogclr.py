"""What ISogCLR promises beyond its family: per-image memories written exactly at the visited
indices, restored bit for bit from a checkpoint, and clear errors for a batch without a usable index
or an unknown number of training images."""

import lightning as L
import pytest
import torch

from ssl_lightning.datamodules import Digits
from ssl_lightning.methods.ssl.isogclr import ISogCLR

from helpers.fakes import fake_loader, quick_trainer, tiny_method

DIGITS_TRAIN_IMAGES = 1437
MEMORIES = ("partition", "tau", "tau_momentum")


class RecordIndices(L.Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append(batch["index"].clone())


def digits():
    return Digits(batch_size=32, num_workers=0)


def memories(model) -> dict[str, torch.Tensor]:
    return {name: getattr(model, name).values.clone() for name in MEMORIES}


def test_memories_change_exactly_at_the_visited_indices():
    model = tiny_method(ISogCLR, in_chans=1, num_classes=10, batch_size=32, optimizer="adamw", lr=1e-3)
    recorder = RecordIndices()
    quick_trainer(max_steps=3, callbacks=[recorder], limit_val_batches=0).fit(model, digits())
    assert model.hparams.num_train_images == DIGITS_TRAIN_IMAGES  # taken from the DataModule
    visited = torch.zeros(DIGITS_TRAIN_IMAGES, dtype=torch.bool)
    visited[torch.cat(recorder.seen)] = True
    assert int(visited.sum()) == 3 * 32
    state = memories(model)
    assert torch.all(state["partition"][~visited] == 0) and torch.all(state["partition"][visited] > 0)
    assert torch.all(state["tau_momentum"][~visited] == 0) and torch.all(state["tau_momentum"][visited] != 0)
    tau = state["tau"]
    assert torch.all(tau[~visited] == model.hparams.tau_init) and torch.all(tau[visited] != model.hparams.tau_init)
    assert torch.all((tau >= model.hparams.tau_min) & (tau <= model.hparams.tau_max))


def test_checkpoint_round_trip_restores_the_memories_bit_for_bit(tmp_path):
    model = tiny_method(ISogCLR, in_chans=1, num_classes=10, batch_size=32, optimizer="adamw", lr=1e-3)
    trainer = quick_trainer(max_steps=3, limit_val_batches=0)
    trainer.fit(model, digits())
    path = tmp_path / "isogclr.ckpt"
    trainer.save_checkpoint(path)
    saved = memories(model)

    # Loaded without data: the saved hyperparameters size the memories.
    loaded = ISogCLR.load_from_checkpoint(path, weights_only=True)
    for name, values in memories(loaded).items():
        assert torch.equal(values, saved[name]), name

    # Resumed by a Trainer: configure_model builds the memories before Lightning restores them.
    resumed = tiny_method(ISogCLR, in_chans=1, num_classes=10, batch_size=32, optimizer="adamw", lr=1e-3)
    quick_trainer(max_steps=3, limit_val_batches=0).fit(resumed, digits(), ckpt_path=path)
    for name, values in memories(resumed).items():
        assert torch.equal(values, saved[name]), name


def batch_of(size=4, **changes):
    batch = next(iter(fake_loader(batch_size=size, length=size, size=16)))
    batch.update(changes)
    return {key: value for key, value in batch.items() if value is not None}


@pytest.mark.parametrize(
    "changes, error, match",
    [
        ({"index": None}, KeyError, r"ISogCLR needs batch\['index'\]"),
        ({"index": torch.tensor([0, 1, 2, 64])}, RuntimeError, "IndexedMemory of 64 images got an index outside 0..63"),
        ({"index": torch.tensor([0.0, 1.0, 2.0, 3.0])}, TypeError, "1-d integer index"),
    ],
)
def test_a_batch_without_a_usable_index_is_rejected(changes, error, match):
    model = tiny_method(ISogCLR, in_chans=1, batch_size=4, num_train_images=64)
    model.configure_model()
    with pytest.raises(error, match=match):
        model.shared_step(batch_of(**changes))


def test_an_unknown_number_of_training_images_is_an_error():
    with pytest.raises(ValueError, match="needs the number of training images.*pass num_train_images="):
        tiny_method(ISogCLR, in_chans=1, batch_size=8, num_train_images=None).configure_model()
    with pytest.raises(ValueError, match="needs the number of training images"):
        quick_trainer(max_steps=1).fit(tiny_method(ISogCLR, in_chans=1, batch_size=8, num_train_images=None),
                                       fake_loader(batch_size=8))


def test_a_size_that_disagrees_with_the_datamodule_is_an_error():
    model = tiny_method(ISogCLR, in_chans=1, batch_size=32, num_train_images=1000)
    with pytest.raises(ValueError, match="num_train_images=1000 .* the DataModule has 1437 training images"):
        quick_trainer(max_steps=1, limit_val_batches=0).fit(model, digits())


def test_bare_dataloaders_train_with_an_explicit_size():
    model = tiny_method(ISogCLR, in_chans=1, batch_size=8, num_train_images=64)
    quick_trainer(max_steps=2).fit(model, fake_loader(batch_size=8, length=64))
    assert int((model.partition.values > 0).sum()) == 16
