"""The supervised family's contract (``SupervisedMethod``) and its baseline, ``Classifier``: labels
required and checked, unlabelled rows masked (one process and two), top-k accuracy, ``test`` results,
predictions, label smoothing, and Mixup / CutMix through timm."""

import json

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssl_lightning import load_backbone
from ssl_lightning.callbacks import EmbeddingWriter, KNNCallback, KNNReport, SpectrumCallback
from ssl_lightning.datamodules import Digits, ImageFolder
from ssl_lightning.methods import Classifier

from helpers.fakes import TINY_BACKBONE, fake_loader, quick_trainer, tiny_method
from helpers.image_data import write_folder


def digits(**kwargs) -> Digits:
    return Digits(batch_size=32, num_workers=0, views="supervised", seed=0, **kwargs)


def test_a_datamodule_without_labels_stops_before_training(tmp_path):
    flat = ImageFolder(str(write_folder(tmp_path / "train", None)), image_size=16, batch_size=2, num_workers=0,
                       views="supervised")
    with pytest.raises(ValueError, match="Classifier needs labelled data, but the DataModule ImageFolder has no labels"):
        quick_trainer(max_steps=1).fit(tiny_method("Classifier"), flat)


def test_num_classes_below_the_datamodules_names_both_numbers():
    with pytest.raises(ValueError, match=r"num_classes=4, but the DataModule Digits has 10 classes \(labels up to 9\)"):
        quick_trainer(max_steps=1).fit(tiny_method("Classifier", num_classes=4), digits())


def test_a_training_label_beyond_num_classes_stops_the_run_naming_both_numbers():
    # Plain dataloaders: labels 0..6 (FakeViews' i % num_classes) for a 4-class head. No IndexError from
    # cross_entropy: the label is masked until the logger step reads the record.
    model = tiny_method("Classifier", in_chans=1, num_classes=4, batch_size=8)
    trainer = quick_trainer(max_steps=6, log_every_n_steps=3, limit_val_batches=0)
    with pytest.raises(ValueError, match="a training batch holds label 6, but num_classes is 4.*at least 7"):
        trainer.fit(model, fake_loader(size=16, num_classes=7))
    assert trainer.global_step == 2  # stopped at the first logger step (step 3)


def labelled_fraction_loader(labelled_every: int, length: int = 32, batch_size: int = 8):
    dataset = fake_loader(size=16).dataset
    rows = [{**dataset[i], "label": dataset[i]["label"] if i % labelled_every == 0 else -1} for i in range(length)]
    return torch.utils.data.DataLoader(rows, batch_size=batch_size)


def test_an_unlabelled_batch_gives_a_zero_loss_and_changes_no_weight():
    # (tests/methods/test_host_syncs.py shows that such steps make no host sync either)
    model = tiny_method("Classifier", in_chans=1, num_classes=4, batch_size=8, weight_decay=0.0, momentum=0.0)
    model.configure_model()
    before = {k: v.clone() for k, v in model.named_parameters()}
    trainer = quick_trainer(max_steps=2, limit_val_batches=0)
    unlabelled = [{**row, "label": -1} for row in fake_loader(size=16).dataset]
    trainer.fit(model, torch.utils.data.DataLoader(unlabelled, batch_size=8))
    assert float(trainer.callback_metrics["train/loss"]) == 0.0
    assert all(torch.equal(before[k], v) for k, v in model.named_parameters())

def test_top_k_accuracy_counts_only_the_labelled_rows():
    model = tiny_method("Classifier", in_chans=1, num_classes=4, batch_size=8)
    trainer = quick_trainer(max_steps=1, log_every_n_steps=1, limit_val_batches=0)
    seen = {}

    class Capture(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            with torch.no_grad():
                logits = pl_module(batch["views"][0])
            labelled = batch["label"] >= 0
            seen["top1"] = (logits.argmax(1) == batch["label"])[labelled].float().mean().item()

    # The weights change in the step; the accuracy logged is that of the step's own logits, so compare
    # against logits recomputed with a learning rate of zero.
    model.hparams.lr = 0.0
    trainer.callbacks.append(Capture())
    trainer.fit(model, labelled_fraction_loader(labelled_every=2))
    assert float(trainer.callback_metrics["train/top1"]) == pytest.approx(seen["top1"])
    assert float(trainer.callback_metrics["train/top5"]) == 1.0  # 4 classes: always among the top 5


def test_test_reports_top_k_and_writes_results_like_the_evaluations(tmp_path):
    model = tiny_method("Classifier", optimizer="adamw", lr=1e-3)
    data = digits()
    trainer = quick_trainer(max_steps=4, default_root_dir=tmp_path)  # less than an epoch: no validation
    trainer.fit(model, data)
    validated = trainer.validate(model, data, verbose=False)[0]
    tested = trainer.test(model, data, verbose=False)[0]
    assert tested["test/top1"] == pytest.approx(validated["val/top1"])  # test uses the held-out split
    assert 0 < tested["test/top1"] <= tested["test/top5"] <= 1
    record = json.loads((tmp_path / "test_top1.json").read_text())
    assert record["value"] == pytest.approx(100 * tested["test/top1"], abs=1e-4) and record["dataset"] == "Digits"
    lines = (tmp_path / "results.md").read_text().splitlines()
    assert [line.split(" | ")[4] for line in lines[2:]] == ["test_top1", "test_top5", "test_ece"]


def plain_ece(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error written out: 15 equal-width bins of the top-1 confidence."""
    confidence, predicted = probs.max(1), probs.argmax(1)
    total = 0.0
    for low, high in zip(np.linspace(0, 1, bins + 1)[:-1], np.linspace(0, 1, bins + 1)[1:]):
        members = (confidence > low) & (confidence <= high)
        if members.any():
            gap = abs((predicted[members] == labels[members]).mean() - confidence[members].mean())
            total += members.mean() * gap
    return total


def test_test_reports_the_expected_calibration_error_of_the_held_out_predictions(tmp_path):
    model = tiny_method("Classifier", optimizer="adamw", lr=1e-3)
    data = digits()
    trainer = quick_trainer(max_steps=4, limit_val_batches=0, default_root_dir=tmp_path,
                            callbacks=[EmbeddingWriter("predictions.npz")])
    trainer.fit(model, data)
    with torch.no_grad():  # sharper logits: an over-confident model, so the error has something to measure
        model.head.weight.mul_(20.0)
    tested = trainer.test(model, data, verbose=False)[0]
    trainer.predict(model, datamodule=data, return_predictions=False)
    saved = np.load(tmp_path / "predictions.npz")
    expected = plain_ece(saved["probs"].astype(np.float64), saved["label"])
    assert expected > 0.05
    assert tested["test/ece"] == pytest.approx(expected, abs=1e-5)
    assert json.loads((tmp_path / "test_ece.json").read_text())["value"] == pytest.approx(100 * expected, abs=1e-3)


def test_predict_writes_logits_and_probabilities(tmp_path):
    model = tiny_method("Classifier", optimizer="adamw", lr=1e-3)
    data = digits()
    trainer = quick_trainer(max_steps=2, limit_val_batches=0, default_root_dir=tmp_path,
                            callbacks=[EmbeddingWriter("predictions.npz")])
    trainer.fit(model, data)
    trainer.predict(model, datamodule=data, return_predictions=False)
    saved = np.load(tmp_path / "predictions.npz")
    assert set(saved.files) == {"feats", "logits", "probs", "label", "index", "split"}
    assert saved["logits"].shape == saved["probs"].shape == (len(saved["index"]), 10)
    np.testing.assert_allclose(saved["probs"].sum(1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(saved["probs"], torch.from_numpy(saved["logits"]).softmax(1).numpy(), rtol=1e-5)
    assert (saved["index"] == np.arange(len(saved["index"]))).all()


def test_the_monitors_and_export_work_for_a_classifier_as_for_the_ssl_methods(tmp_path):
    report = KNNReport(k=5)
    trainer = quick_trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=3, default_root_dir=tmp_path,
                            callbacks=[KNNCallback(k=5), SpectrumCallback(), report], enable_checkpointing=True)
    model = tiny_method("Classifier", optimizer="adamw", lr=1e-3)
    trainer.fit(model, digits())
    metrics = trainer.callback_metrics
    assert {"val/knn_top1", "rankme/feats", "rankme/embeds", "erank/embeds"} <= set(metrics)
    assert float(metrics["rankme/embeds"]) <= 10  # the embeddings are the 10 logits
    assert set(report.results) == {"trained backbone", "random init (seed 0)", "raw pixels"}
    checkpoint = trainer.checkpoint_callback.best_model_path
    backbone = load_backbone(checkpoint)  # the export path: backbone. prefix, hyperparameters, data facts
    assert all(torch.equal(value, model.backbone.state_dict()[key]) for key, value in backbone.state_dict().items())


def test_label_smoothing_is_torchs_cross_entropy_rule():
    model = tiny_method("Classifier", in_chans=1, num_classes=4, batch_size=8, label_smoothing=0.1)
    model.configure_model()
    batch = next(iter(fake_loader(size=16)))
    out = model.shared_step(batch)
    expected = F.cross_entropy(model(batch["views"][0]), batch["label"], label_smoothing=0.1)
    torch.testing.assert_close(out["loss"], expected)


def test_mixup_mixes_each_image_with_its_partner_in_the_reversed_batch():
    # The row weights assume timm's pairing (row i with row n - 1 - i); this holds them to it.
    model = Classifier(**TINY_BACKBONE, in_chans=1, num_classes=4, batch_size=8, mixup_alpha=1.0, label_smoothing=0.1)
    model.configure_model()
    images = torch.rand(8, 1, 16, 16)
    labels = torch.tensor([0, 1, 2, 3, -1, 1, 2, 0])
    mixed, targets, weights = model._mix(images.clone(), labels)
    lam = float((mixed[0, 0, 0, 0] - images[-1, 0, 0, 0]) / (images[0, 0, 0, 0] - images[-1, 0, 0, 0]))
    torch.testing.assert_close(mixed, lam * images + (1 - lam) * images.flip(0))
    smoothed = F.one_hot(labels.clamp(min=0), 4).float() * 0.9 + 0.1 / 4
    torch.testing.assert_close(targets, lam * smoothed + (1 - lam) * smoothed.flip(0))
    assert weights.tolist() == [1, 1, 1, 0, 0, 1, 1, 1]  # row 4 is unlabelled, and row 3 is its partner


def test_mixup_and_cutmix_train_without_top_k_and_refuse_an_odd_batch():
    model = tiny_method("Classifier", in_chans=1, num_classes=4, batch_size=8, mixup_alpha=0.8, cutmix_alpha=1.0)
    trainer = quick_trainer(max_steps=3, log_every_n_steps=1)
    trainer.fit(model, fake_loader(size=16))
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert "train/top1" not in trainer.callback_metrics  # a mixed image has two labels
    batch = next(iter(fake_loader(batch_size=7, size=16)))
    with pytest.raises(ValueError, match="needs an even batch; got 7 images"):
        model.shared_step(batch)


class InterleavedRanks(torch.utils.data.Dataset):
    """Rows 0..31, the odd ones unlabelled. One process reads them all in order; rank r of two reads
    rows r, r + 2, r + 4, ... in order, so each global batch is the single process's batch and rank 1
    sees no label at all."""

    def __init__(self, length: int = 32):
        self.rows = [{**row, "label": row["label"] if i % 2 == 0 else -1}
                     for i, row in enumerate(fake_loader(size=16, length=length).dataset)]

    def _world(self) -> tuple[int, int]:
        distributed = torch.distributed.is_initialized()
        return (torch.distributed.get_world_size(), torch.distributed.get_rank()) if distributed else (1, 0)

    def __len__(self):
        return len(self.rows) // self._world()[0]

    def __getitem__(self, i):
        world_size, rank = self._world()
        return self.rows[i * world_size + rank]


class SaveWeights(L.Callback):
    def __init__(self, path):
        self.path = path

    def on_train_end(self, trainer, pl_module):
        if trainer.global_rank == 0:
            torch.save({k: v.detach().clone() for k, v in pl_module.state_dict().items()}, self.path)


def no_batchnorm_classifier() -> Classifier:
    # Without BatchNorm, two processes of 8 images compute exactly what one process of 16 does.
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = Classifier(backbone=backbone, in_chans=1, num_classes=4, batch_size=8, lr=25.6, warmup_steps=0)
    model.configure_model()  # the head too, here: a spawned process would draw it from its own RNG
    return model


@pytest.mark.ddp
@pytest.mark.timeout(240)
def test_a_rank_without_labels_trains_in_step_with_the_other(tmp_path):
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, callbacks=[SaveWeights(tmp_path / "ddp.pt")])
    trainer.fit(no_batchnorm_classifier(), torch.utils.data.DataLoader(InterleavedRanks(), batch_size=8))
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)

    single = no_batchnorm_classifier()
    single.hparams.batch_size = 16  # the same global batch, hence the same scaled LR
    quick_trainer(max_steps=2, callbacks=[SaveWeights(tmp_path / "one.pt")]).fit(
        single, torch.utils.data.DataLoader(InterleavedRanks(), batch_size=16))
    expected = torch.load(tmp_path / "one.pt", weights_only=True)
    for key, value in expected.items():
        torch.testing.assert_close(ddp[key], value, rtol=1e-4, atol=1e-5)  # float32 sums in another order
    assert not torch.equal(expected["head.weight"], no_batchnorm_classifier().state_dict()["head.weight"])
