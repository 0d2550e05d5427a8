"""Training data order and augmentations as functions of (seed, epoch, index); resuming by skipping;
RNG states in checkpoints."""

import random

import lightning as L
import numpy as np
import pytest
import torch

from ssl_lightning.callbacks import RandomStates
from ssl_lightning.callbacks.random_states import capture_rng_states, restore_rng_states
from ssl_lightning.datamodules import Digits
from ssl_lightning.datamodules.device_batches import make_views_on_device
from ssl_lightning.datamodules.device_views import DeviceViews
from ssl_lightning.datamodules.sampling import Position, ResumableDataLoader, SeededSampler
from ssl_lightning.datamodules.views import resolve_views
from ssl_lightning.methods import SimCLR

from helpers.fakes import TINY_BACKBONE


def passes(sampler: SeededSampler, epoch: int) -> list[tuple[int, int]]:
    sampler.set_epoch(epoch)
    return list(sampler)


def test_order_and_seeds_depend_only_on_seed_and_epoch():
    first, again = SeededSampler(50, seed=3), SeededSampler(50, seed=3)
    assert passes(first, 0) == passes(again, 0)
    assert passes(first, 1) == passes(again, 1)
    assert passes(first, 0) != passes(first, 1)
    assert passes(SeededSampler(50, seed=4), 0) != passes(first, 0)
    indices = [index for index, _ in passes(first, 0)]
    assert sorted(indices) == list(range(50)) and indices != list(range(50))


def test_ranks_share_one_epoch_order_and_each_sample_keeps_its_seed_whatever_the_world_size():
    alone = dict(passes(SeededSampler(51, seed=7), 2))
    rank0, rank1 = (passes(SeededSampler(51, num_replicas=2, rank=rank, seed=7), 2) for rank in (0, 1))
    assert len(rank0) == len(rank1) == 26  # 51 padded to 52, as DistributedSampler pads
    assert set(dict(rank0)) | set(dict(rank1)) == set(range(51))
    assert len(set(dict(rank0)) & set(dict(rank1))) == 1  # only the padding sample repeats
    for index, seed in rank0 + rank1:
        assert alone[index] == seed  # so device views differ between ranks, and agree with a 1-process run


def test_resume_skips_the_consumed_samples_of_that_epoch_only():
    sampler = SeededSampler(40, seed=1)
    full_epoch_2, full_epoch_3 = passes(sampler, 2), passes(sampler, 3)
    sampler.resume_at(Position(epoch=2, samples_done=24))
    assert list(sampler) == full_epoch_2[24:]
    assert list(sampler) == full_epoch_2  # the offset applies to one pass
    assert passes(sampler, 3) == full_epoch_3
    assert len(sampler) == 40  # Lightning's epoch length stays the full share


def test_resume_with_another_process_count_warns_and_skips_the_same_share():
    sampler = SeededSampler(40, num_replicas=2, rank=0, seed=1)
    with pytest.warns(UserWarning, match="written by 1 process"):
        sampler.load_state_dict({"seed": 1, "num_replicas": 1, "epoch": 0, "samples_done": 16})
    assert len(list(sampler)) == 20 - 8


def test_resume_beyond_the_epoch_is_an_error_naming_the_cause():
    with pytest.raises(ValueError, match="another dataset size or number of processes"):
        SeededSampler(40, seed=1).resume_at(Position(0, 41))


def test_loader_state_is_the_consumed_position_and_moves_to_the_next_epoch_once_finished():
    consumed = [(3, False)]
    sampler = SeededSampler(40, seed=5)
    sampler.set_epoch(4)
    loader = ResumableDataLoader(range(40), batch_size=8, sampler=sampler, consumed_batches=lambda: consumed[0])
    assert loader.state_dict() == {"seed": 5, "num_replicas": 1, "epoch": 4, "samples_done": 24}
    consumed[0] = (5, True)
    assert loader.state_dict() == {"seed": 5, "num_replicas": 1, "epoch": 5, "samples_done": 0}
    other = ResumableDataLoader(range(40), batch_size=8, sampler=SeededSampler(40, seed=9))
    other.load_state_dict({"seed": 5, "epoch": 4, "samples_done": 24})
    assert list(other.sampler) == passes(SeededSampler(40, seed=5), 4)[24:]


def test_a_training_item_draws_its_views_from_its_own_seed_and_leaves_the_global_rng_alone():
    data = Digits(batch_size=4, num_workers=0, view_device="cpu")
    data.setup("fit")
    dataset = data._datasets["train"]
    before = torch.get_rng_state()
    first, again, other = dataset[(5, 123)], dataset[(5, 123)], dataset[(5, 124)]
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(a, b) for a, b in zip(first["views"], again["views"]))
    assert not torch.equal(first["views"][0], other["views"][0])
    assert first["index"] == 5


def test_device_views_are_seeded_by_the_batch_and_the_seed_does_not_reach_the_method():
    views = DeviceViews(resolve_views("simclr", 16, 3), (0.5,) * 3, (0.25,) * 3)
    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    batch = {"image": images, "label": torch.zeros(6, dtype=torch.long), "index": torch.arange(6)}
    first = make_views_on_device({**batch, "seed": 11}, views)
    again = make_views_on_device({**batch, "seed": 11}, views)
    other_rank = make_views_on_device({**batch, "seed": 12}, views)
    assert "seed" not in first and set(first) == {"views", "label", "index"}
    assert torch.equal(first["views"][0], again["views"][0])
    assert not torch.equal(first["views"][0], other_rank["views"][0])


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    torch.save({"rng_states": capture_rng_states()}, tmp_path / "states.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(2), np.random.seed(2), random.seed(2)
    restore_rng_states(torch.load(tmp_path / "states.pt", weights_only=True)["rng_states"])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]


def fit_digits(tmp_path, data: dict, ckpt_path=None) -> L.Trainer:
    L.seed_everything(0)
    model = SimCLR(**{**TINY_BACKBONE, "backbone_kwargs": {**TINY_BACKBONE["backbone_kwargs"], "drop_path_rate": 0.2}},
                   proj_hidden_dim=32, proj_dim=16, optimizer="adamw", lr=1e-3)
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=2, limit_train_batches=3, limit_val_batches=1, logger=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        callbacks=[RandomStates(), L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_top_k=-1)],
    )
    trainer.fit(model, Digits(batch_size=32, num_workers=0, **data), ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize("data", [{"view_device": "cpu"}, {"view_device": "device"}, {"in_memory": True}])
def test_resuming_from_an_end_of_epoch_checkpoint_written_after_validation_continues_exactly(tmp_path, data):
    straight = fit_digits(tmp_path / "straight", data)
    # Written at the end of epoch 0's validation, not in a training batch.
    resumed = fit_digits(tmp_path / "resumed", data, ckpt_path=tmp_path / "straight" / "epoch=0-step=3.ckpt")
    assert resumed.global_step == straight.global_step == 6
    expected, got = straight.lightning_module.state_dict(), resumed.lightning_module.state_dict()
    for name, tensor in expected.items():
        assert torch.equal(tensor, got[name]), name


def test_a_checkpoint_from_another_world_size_warns_that_the_rng_cannot_continue_exactly():
    class OneRank:
        world_size, global_rank = 2, 0
        state = type("State", (), {"fn": "fit"})()

    with pytest.warns(UserWarning, match="RNG states of 1 process"):
        RandomStates().on_load_checkpoint(OneRank(), None, {"rng_states": [capture_rng_states()]})


class FirstBatchPerRank(L.Callback):
    """Each rank writes its first training batch's indices and views (ddp_spawn returns nothing else)."""

    def __init__(self, directory):
        self.directory = directory

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            torch.save({"index": batch["index"], "view": batch["views"][0]}, self.directory / f"rank{trainer.global_rank}.pt")


@pytest.mark.ddp
@pytest.mark.timeout(240)
def test_two_ranks_draw_other_samples_and_views_and_checkpoints_hold_both_rng_states(tmp_path):
    L.seed_everything(0)  # the same seed on both ranks, as a config's seed_everything gives them
    model = SimCLR(**TINY_BACKBONE, proj_hidden_dim=32, proj_dim=16, optimizer="adamw", lr=1e-3)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=2, limit_val_batches=0, logger=False,
        enable_progress_bar=False, enable_model_summary=False,
        callbacks=[RandomStates(), FirstBatchPerRank(tmp_path),
                   L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=1)],
    )
    trainer.fit(model, Digits(batch_size=16, num_workers=0, view_device="device"))
    first, second = (torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1))
    assert not set(first["index"].tolist()) & set(second["index"].tolist())
    assert not torch.equal(first["view"], second["view"])
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert len(checkpoint["rng_states"]) == 2
    assert checkpoint["Digits"]["train_data_position"]["num_replicas"] == 2


def test_evaluating_a_checkpoint_neither_restores_nor_warns_about_rng_states(recwarn):
    class Validating:
        world_size, global_rank = 1, 0
        state = type("State", (), {"fn": "validate"})()

    callback = RandomStates()
    callback.on_load_checkpoint(Validating(), None, {})
    assert callback._pending is None and not recwarn.list
