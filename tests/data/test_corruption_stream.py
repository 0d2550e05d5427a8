"""CorruptionStream: the batch contract with `domain` and `reset`, the five protocols' orders, labels,
the on-disk cache (read back, not recomputed), the split over processes, YAML and a Trainer.test run."""

import numpy as np
import pytest
import torch

from ssl_lightning.datamodules import NpzArrays
from ssl_lightning.datamodules import corruption_stream as stream_module
from ssl_lightning.datamodules.corruption_stream import (
    GRADUAL_SEVERITIES,
    CorruptionStream,
    StreamSampler,
    derived_seed,
)
from ssl_lightning.datamodules.corruptions import CORRUPTIONS, corrupt

from helpers.threads import one_thread  # noqa: F401 (autouse: one intra-op thread)

NUM_TEST, NUM_CLASSES, SIZE = 60, 3, 16
TWO = ["gaussian_noise", "fog"]


def write_npz(path, labelled=True):
    rng = np.random.default_rng(0)
    labels = np.arange(NUM_TEST) % NUM_CLASSES if labelled else np.full(NUM_TEST, -1)
    np.savez(
        path,
        x_train=rng.integers(0, 256, (6, SIZE, SIZE, 3), dtype=np.uint8),
        y_train=np.arange(6) % NUM_CLASSES,
        x_test=rng.integers(0, 256, (NUM_TEST, SIZE, SIZE, 3), dtype=np.uint8),
        y_test=labels,
    )
    return path


@pytest.fixture
def npz_path(tmp_path):
    return write_npz(tmp_path / "data.npz")


def make_stream(npz_path, tmp_path, **kwargs):
    kwargs = {"corruptions": TWO, "batch_size": 7, "num_workers": 0, "cache_dir": str(tmp_path / "cache"), **kwargs}
    return CorruptionStream(NpzArrays(str(npz_path), num_workers=0), **kwargs)


def batches_of(stream):
    stream.prepare_data()
    stream.setup("test")
    return list(stream.test_dataloader())


def test_data_facts_come_from_the_source_before_setup(npz_path, tmp_path):
    stream = CorruptionStream(NpzArrays(str(npz_path), num_workers=0), cache_dir=str(tmp_path))
    assert (stream.num_classes, stream.in_chans, stream.image_size) == (NUM_CLASSES, 3, SIZE)
    assert (stream.mean, stream.std) == (stream.source.mean, stream.source.std)
    assert stream.batch_size == 200 and stream.num_views == 1
    assert stream.domains == [(name, 5) for name in CORRUPTIONS]
    assert stream.domain_names[0] == "gaussian_noise_5"


def test_batches_hold_the_plain_view_of_the_corrupted_images(npz_path, tmp_path):
    stream = make_stream(npz_path, tmp_path, severities=[2])
    batches = batches_of(stream)
    clean = torch.from_numpy(np.load(npz_path)["x_test"]).permute(0, 3, 1, 2)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (stream.mean, stream.std))
    for d, (name, severity) in enumerate(stream.domains):  # one chunk here, so one corrupt() call per domain
        expected = corrupt(clean, name, severity, derived_seed(1, name, severity, 0))
        for batch in batches:
            assert set(batch) == {"views", "label", "index", "domain", "reset"}
            assert batch["domain"].dtype == torch.int64 and batch["reset"].dtype == torch.bool
            mine = batch["domain"] == d
            reference = (expected[batch["index"][mine]].float() / 255 - mean) / std
            torch.testing.assert_close(batch["views"][0][mine], reference)


@pytest.mark.parametrize("protocol", ["continual", "reset_each_shift", "gradual", "mixed_domains", "correlated"])
def test_labels_are_the_sources(npz_path, tmp_path, protocol):
    labels = torch.from_numpy(np.load(npz_path)["y_test"])
    for batch in batches_of(make_stream(npz_path, tmp_path, protocol=protocol)):
        assert torch.equal(batch["label"], labels[batch["index"]])


def domain_runs(batches):
    """The stream's domain per image, and each batch's set of domains."""
    return torch.cat([b["domain"] for b in batches]), [set(b["domain"].tolist()) for b in batches]


def test_continual_streams_the_15_domains_in_order_each_image_once(npz_path, tmp_path):
    stream = make_stream(npz_path, tmp_path, corruptions=None, num_samples=4, batch_size=3)
    batches = batches_of(stream)
    assert [name for name, _ in stream.domains] == list(CORRUPTIONS)
    domains, per_batch = domain_runs(batches)
    assert torch.equal(domains, torch.arange(15).repeat_interleave(4))
    assert all(len(found) == 1 for found in per_batch)  # no batch straddles two domains
    indices = torch.cat([b["index"] for b in batches]).view(15, 4)
    assert all(sorted(row.tolist()) == sorted(indices[0].tolist()) for row in indices)
    assert not any(b["reset"].any() for b in batches)


def test_reset_each_shift_marks_the_first_batch_of_every_domain(npz_path, tmp_path):
    batches = batches_of(make_stream(npz_path, tmp_path, protocol="reset_each_shift", severities=[1, 5]))
    previous = None
    for batch in batches:
        domain = int(batch["domain"][0])
        assert bool(batch["reset"].all()) == (domain != previous) and bool(batch["reset"].any()) == (domain != previous)
        previous = domain


def test_gradual_goes_up_to_severity_5_and_back_per_corruption(npz_path, tmp_path):
    stream = make_stream(npz_path, tmp_path, protocol="gradual", num_samples=7)
    assert stream.domains == [(name, s) for name in TWO for s in GRADUAL_SEVERITIES]
    domains, per_batch = domain_runs(batches_of(stream))
    assert torch.equal(domains, torch.arange(18).repeat_interleave(7)) and all(len(d) == 1 for d in per_batch)


def test_mixed_domains_serves_every_image_domain_pair_once_shuffled(npz_path, tmp_path):
    stream = make_stream(npz_path, tmp_path, protocol="mixed_domains", severities=[3, 5])
    batches = batches_of(stream)
    pairs = [(d, i) for b in batches for d, i in zip(b["domain"].tolist(), b["index"].tolist())]
    assert len(pairs) == len(set(pairs)) == NUM_TEST * 4
    assert set(pairs) == {(d, i) for d in range(4) for i in range(NUM_TEST)}
    assert sum(len(found) > 1 for found in domain_runs(batches)[1]) > len(batches) // 2


def test_correlated_orders_each_domain_in_label_runs(npz_path, tmp_path):
    stream = make_stream(npz_path, tmp_path, protocol="correlated")
    batches = batches_of(stream)
    domains = torch.cat([b["domain"] for b in batches])
    indices, labels = torch.cat([b["index"] for b in batches]), torch.cat([b["label"] for b in batches])
    for d in range(len(stream.domains)):
        order = indices[domains == d]
        assert sorted(order.tolist()) == list(range(NUM_TEST))  # a permutation of the test images
        assert torch.equal(order, indices[domains == 0])  # the same order in every domain, as the benchmark
        changes = int((labels[domains == d][1:] != labels[domains == d][:-1]).sum())
        # K chunks, each its classes one after the other: at most K * K runs (a shuffle has ~40 changes)
        assert changes <= NUM_CLASSES**2 - 1


def test_correlated_needs_labels(tmp_path):
    stream = make_stream(write_npz(tmp_path / "unlabelled.npz", labelled=False), tmp_path, protocol="correlated")
    with pytest.raises(ValueError, match="correlated.*unlabelled"):
        batches_of(stream)


def test_unlabelled_sources_stream_with_label_minus_one(tmp_path):
    batches = batches_of(make_stream(write_npz(tmp_path / "unlabelled.npz", labelled=False), tmp_path))
    assert all(bool((b["label"] == -1).all()) for b in batches)


def test_num_samples_is_a_seeded_subset(npz_path, tmp_path):
    def subset(seed):
        stream = make_stream(npz_path, tmp_path, num_samples=5, seed=seed, corruptions=["contrast"])
        return sorted(torch.cat([b["index"] for b in batches_of(stream)]).tolist())

    first = subset(1)
    assert len(set(first)) == 5 and first == subset(1) and first != subset(2)


def test_the_cache_is_read_back_not_recomputed_and_a_new_seed_gets_its_own_file(npz_path, tmp_path, monkeypatch):
    calls = []

    def counting(*args, **kwargs):
        calls.append(args[1:3])
        return corrupt(*args, **kwargs)

    monkeypatch.setattr(stream_module, "corrupt", counting)
    first = make_stream(npz_path, tmp_path)
    first_batches = batches_of(first)
    assert sorted(calls) == sorted(first.domains)
    files = sorted((tmp_path / "cache").rglob("*.npz"))
    assert len(files) == 2 and not list((tmp_path / "cache").rglob("*.tmp"))  # renamed into place, nothing left
    with np.load(files[0]) as stored:
        assert stored["images"].dtype == np.uint8 and stored["images"].shape == (NUM_TEST, 3, SIZE, SIZE)
        assert int(stored["seed"]) == 1

    calls.clear()
    again = make_stream(npz_path, tmp_path)
    for old, new in zip(first_batches, batches_of(again)):
        assert torch.equal(old["views"][0], new["views"][0])
    assert calls == []

    reseeded = make_stream(npz_path, tmp_path, seed=2)
    batches_of(reseeded)
    assert len(calls) == 2 and len(list((tmp_path / "cache").rglob("*.npz"))) == 4


def test_an_unreadable_cache_file_is_generated_again(npz_path, tmp_path):
    stream = make_stream(npz_path, tmp_path, corruptions=["contrast"])
    reference = batches_of(stream)
    (path,) = (tmp_path / "cache").rglob("*.npz")
    path.write_bytes(b"not a zip file")
    with pytest.warns(UserWarning, match="unreadable"):
        again = batches_of(make_stream(npz_path, tmp_path, corruptions=["contrast"]))
    assert torch.equal(reference[0]["views"][0], again[0]["views"][0])
    with np.load(path) as stored:
        assert stored["images"].shape[0] == NUM_TEST


def test_processes_split_each_global_batch_and_stay_on_one_domain(npz_path, tmp_path):
    stream = make_stream(npz_path, tmp_path, batch_size=4)
    stream.prepare_data()
    stream.setup("test")
    batches = stream._global_batches(stream._segments, world_size=2)
    assert {end - start for start, end, _ in batches} == {8, 4}  # 60 per domain: 7 x 8 + 4
    shares = [list(StreamSampler(batches, 2, rank)) for rank in range(2)]
    assert len(shares[0]) == len(shares[1]) == len(batches)
    for (start, end, _), part0, part1 in zip(batches, *shares):
        assert (part0[0], part0[1], part1[0], part1[1]) == (start, (start + end) // 2, (start + end) // 2, end)
    with pytest.raises(ValueError, match="batch of 4 images, fewer than the 7 processes"):  # 60 = 2 x 28 + 4
        stream._global_batches(stream._segments, world_size=7)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"corruptions": ["fogg"]}, "unknown corruption 'fogg'; valid corruptions: gaussian_noise"),
        ({"severities": [0, 5]}, "severities must be a non-empty list of 1-5"),
        ({"protocol": "continuous"}, "protocol must be one of continual, reset_each_shift"),
        ({"num_samples": 0}, "num_samples must be positive"),
        ({"constants": "mnist"}, "constants must be 'auto' or one of"),
    ],
)
def test_bad_arguments_say_what_is_valid(npz_path, tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_stream(npz_path, tmp_path, **kwargs)


def test_only_the_test_stage_is_served(npz_path, tmp_path):
    with pytest.raises(ValueError, match="serves the test stage"):
        make_stream(npz_path, tmp_path).setup("fit")


def test_a_yaml_config_builds_the_stream_around_a_nested_source(npz_path, tmp_path):
    import lightning as L
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_subclass_arguments(L.LightningDataModule, "data")  # as the CLI's subclass_mode_data
    config = parser.parse_string(f"""
data:
  class_path: ssl_lightning.datamodules.corruption_stream.CorruptionStream
  init_args:
    source:
      class_path: NpzArrays
      init_args: {{path: {npz_path}, num_workers: 0}}
    corruptions: [fog, contrast]
    protocol: gradual
    cache_dir: {tmp_path / "cache"}
""")
    stream = parser.instantiate(config).data
    assert isinstance(stream.source, NpzArrays) and stream.domains[:2] == [("fog", 1), ("fog", 2)]


def test_trainer_test_receives_the_stream_in_order(npz_path, tmp_path):
    import lightning as L

    class Recorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.seen = []

        def test_step(self, batch, batch_idx):
            self.seen.append((batch["domain"].clone(), batch["index"].clone()))

    stream = make_stream(npz_path, tmp_path, protocol="reset_each_shift", batch_size=16)
    recorder = Recorder()
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.test(recorder, stream)
    domains = torch.cat([d for d, _ in recorder.seen])
    assert torch.equal(domains, torch.arange(2).repeat_interleave(NUM_TEST))
    assert [len(d) for d, _ in recorder.seen] == [16, 16, 16, 12] * 2
