"""The spine every registered method shares (``TrainModule``): fit from a DataModule's facts,
checkpoints, the view-count and batch contracts, logging, the optimizer report."""

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from ssl_lightning.callbacks import KNNCallback
from ssl_lightning.datamodules import Digits
from ssl_lightning.methods import METHODS, SimCLR

from helpers.fakes import SMALL_HEADS, TINY_VIT, fake_loader, quick_trainer, tiny_method
from helpers.registry import FAMILY_OF, FIT_METRICS, every_method, view_preset


@pytest.mark.parametrize("name", every_method())
def test_fast_dev_run_on_digits_learns_from_datamodule_facts(name):
    model = tiny_method(name)  # in_chans, num_classes, batch size: read from the DataModule
    datamodule = Digits(batch_size=32, num_workers=0, views=view_preset(name))
    trainer = quick_trainer(fast_dev_run=2, callbacks=[KNNCallback(k=5)])
    trainer.fit(model, datamodule)
    metrics = trainer.callback_metrics
    assert model.hparams.in_chans == 1 and model.hparams.num_classes == 10 and model.hparams.batch_size == 32
    assert torch.isfinite(metrics["train/loss"])
    assert FIT_METRICS[FAMILY_OF[name]] | {"val/knn_top5", "lr/weights", "lr/no_decay"} <= set(metrics)


@pytest.mark.parametrize("name", every_method())
def test_checkpoint_loads_with_weights_only(name, short_fit):
    fit = short_fit(name)  # helpers/short_fit.py: 6 steps, then a checkpoint
    model = fit.model
    restored = METHODS[name].load_from_checkpoint(fit.checkpoint, weights_only=True)
    for key, value in model.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key
    x = torch.randn(2, 1, 16, 16)
    model.eval(), restored.eval()
    torch.testing.assert_close(restored(x), model(x))


@pytest.mark.parametrize("name,views,made", [("SimCLR", "dino", 8), ("Classifier", "simclr", 2)])
def test_view_recipe_that_does_not_fit_the_method_is_rejected_before_training(name, views, made):
    model = tiny_method(name)
    wanted = METHODS[name].expected_views
    with pytest.raises(ValueError, match=rf"{name} needs {wanted} views? per image, but the DataModule's view recipe makes {made}"):
        quick_trainer(fast_dev_run=1).fit(model, Digits(batch_size=32, num_workers=0, views=views))


@pytest.mark.parametrize("name", every_method())
def test_batch_without_views_names_the_missing_view_hook(name):
    model = tiny_method(name, in_chans=1, num_classes=4, batch_size=8)
    model.configure_model()
    with pytest.raises(RuntimeError, match="view hook \\(on_after_batch_transfer\\) did not run"):
        model.training_step({"image": torch.zeros(2, 1, 16, 16), "label": torch.zeros(2), "index": torch.arange(2)}, 0)


def test_custom_backbone_module_is_not_saved_in_hyperparameters(tmp_path):
    backbone = nn.Sequential(nn.Conv2d(1, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = SimCLR(backbone=backbone, in_chans=1, num_classes=4, batch_size=8, **SMALL_HEADS)
    assert "backbone" not in model.hparams
    trainer = quick_trainer(max_steps=1)
    trainer.fit(model, fake_loader(size=16))
    assert model.backbone is backbone and model.feat_dim == 8
    path = tmp_path / "custom.ckpt"
    trainer.save_checkpoint(path)
    fresh = nn.Sequential(nn.Conv2d(1, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    restored = SimCLR.load_from_checkpoint(path, backbone=fresh, weights_only=True)
    assert torch.equal(restored.backbone[0].weight, backbone[0].weight)


def test_learning_rates_and_momentum_reach_every_row_the_logger_writes(tmp_path):
    model = tiny_method("BYOL", in_chans=1, batch_size=8, optimizer="adamw", lr=1e-3)
    logger = L.pytorch.loggers.CSVLogger(tmp_path)
    quick_trainer(max_steps=6, log_every_n_steps=3, logger=logger).fit(model, fake_loader(batch_size=8, length=64))
    rows = list(csv.DictReader(open(f"{logger.log_dir}/metrics.csv")))
    assert [row["step"] for row in rows] == ["2", "5"]
    assert all(row["lr/weights"] and row["lr/no_decay"] and row["momentum"] and row["train/loss"] for row in rows)


def test_step_logging_turned_off_trains_and_logs_no_step(tmp_path):
    model = tiny_method("BYOL", in_chans=1, num_classes=4, batch_size=8, optimizer="adamw", lr=1e-3)
    logger = L.pytorch.loggers.CSVLogger(tmp_path)
    trainer = quick_trainer(max_steps=4, log_every_n_steps=0, logger=logger)
    trainer.fit(model, fake_loader(batch_size=8, length=64))
    assert trainer.global_step == 4
    rows = list(csv.DictReader(open(f"{logger.log_dir}/metrics.csv"))) if Path(logger.log_dir, "metrics.csv").exists() else []
    assert not any(row.get("train/loss") for row in rows)


def test_grad_checkpointing_recomputes_blocks_and_keeps_loss_and_gradients():
    batch = next(iter(fake_loader(batch_size=8, length=8, size=16)))

    def loss_grads_and_block_calls(checkpointing: bool):
        torch.manual_seed(0)
        model = METHODS["SimCLR"](**TINY_VIT, **SMALL_HEADS, in_chans=1, batch_size=8, grad_checkpointing=checkpointing)
        model.configure_model()
        calls = []
        # A pre-hook: the recomputation in backward stops once it has what it needs, before the block returns.
        model.backbone.blocks[0].register_forward_pre_hook(lambda *args: calls.append(1))
        loss = model.shared_step(batch)["loss"]
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.backbone.parameters()], len(calls)

    loss, grads, calls = loss_grads_and_block_calls(False)
    loss_checkpointed, grads_checkpointed, calls_checkpointed = loss_grads_and_block_calls(True)
    assert (calls, calls_checkpointed) == (2, 4)  # two views; with checkpointing each block runs again in backward
    torch.testing.assert_close(loss_checkpointed, loss, rtol=0, atol=0)
    for grad, grad_checkpointed in zip(grads, grads_checkpointed):
        torch.testing.assert_close(grad_checkpointed, grad, rtol=1e-6, atol=1e-7)


def test_the_resolved_learning_rate_and_global_batch_are_reported(caplog):
    caplog.set_level("INFO")
    model = tiny_method("SimCLR", in_chans=1, batch_size=8, optimizer="adamw", lr=0.4, lr_scaling="linear",
                        warmup_steps=2)
    quick_trainer(max_steps=4, accumulate_grad_batches=2).fit(model, fake_loader(batch_size=8, length=64))
    assert ("Optimizer adamw: peak LR 0.025 (lr 0.4 per 256 images, lr_scaling linear, global batch 16 = 8 per "
            "process x 1 process(es) x 2 accumulated)") in caplog.text
    assert "4 steps, 2 of warm-up, schedule warmup_cosine." in caplog.text
