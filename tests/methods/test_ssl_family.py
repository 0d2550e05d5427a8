"""The self-supervised family's contract (``SSLMethod``): the online probe on detached features, with
its own learning rate, and ``embed`` / validation / predict outputs the monitors read."""

import pytest
import torch

from ssl_lightning.methods import FAMILIES

from helpers.fakes import fake_loader, quick_trainer, tiny_method

SSL_METHODS = sorted(FAMILIES["ssl"])


def test_unlabelled_batches_skip_the_probe():
    model = tiny_method("BarlowTwins", in_chans=1, num_classes=4, batch_size=8)
    trainer = quick_trainer(max_steps=2)
    dataset = fake_loader(size=16).dataset
    loader = torch.utils.data.DataLoader([{**dataset[i], "label": -1} for i in range(len(dataset))], batch_size=8)
    model.configure_model()
    before = model.probe.weight.clone()
    trainer.fit(model, loader)
    assert torch.equal(model.probe.weight, before)
    assert "train/probe_loss" not in trainer.callback_metrics
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


@pytest.mark.parametrize("name", SSL_METHODS)
def test_the_probe_learns_from_detached_features_at_its_own_learning_rate(name):
    model = tiny_method(name, in_chans=1, num_classes=4, batch_size=64, optimizer="adamw", lr=0.4, probe_lr=0.2)
    trainer = quick_trainer(max_steps=1)
    trainer.fit(model, fake_loader(batch_size=64, length=64, size=16))
    lrs = {group["name"]: group["initial_lr"] for group in trainer.optimizers[0].param_groups}
    assert lrs["probe"] == pytest.approx(0.2 * 64 / 256) and lrs["weights"] == pytest.approx(0.4 * 64 / 256)
    batch = next(iter(fake_loader(size=16)))
    out = model.shared_step(batch)
    model.zero_grad()
    model.training_extras(batch, out, logs_now=False).backward()  # the probe's loss alone
    assert model.probe.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.backbone.parameters())  # detached: the backbone learns nothing


@pytest.mark.parametrize("name", SSL_METHODS)
def test_validation_and_predict_give_features_embeddings_labels_and_indices(name):
    model = tiny_method(name, in_chans=1, num_classes=4, batch_size=8)
    model.configure_model()
    model.eval()
    batch = next(iter(fake_loader(size=16)))
    with torch.no_grad():
        for out in (model.validation_step(batch, 0, dataloader_idx=1), model.predict_step(batch, 0)):
            assert set(out) == {"feats", "embeds", "label", "index"}
            assert out["feats"].shape == (8, model.feat_dim) and out["embeds"].shape[0] == 8
            assert torch.equal(out["label"], batch["label"]) and torch.equal(out["index"], batch["index"])
