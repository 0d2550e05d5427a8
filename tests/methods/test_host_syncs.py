"""Training steps never make the host wait for the accelerator, except on the steps the logger writes.

A wait (a host sync) drains the GPU's queue: the Python side of the next step can no longer run
ahead while the GPU computes. ``host_syncs.HostSyncCounter`` counts the operations that sync on a
GPU while the same code runs here on the CPU; ``test_gpu.py`` checks the same on a real GPU.
"""

import lightning as L
import pytest
import torch

from ssl_lightning.callbacks import ThrottledProgressBar
from ssl_lightning.datamodules import device_views
from ssl_lightning.datamodules.device_views import DeviceViews
from ssl_lightning.datamodules.views import resolve_views
from ssl_lightning.evaluation import FineTune

from helpers.fakes import fake_loader, tiny_method
from helpers.host_syncs import HostSyncCounter
from helpers.registry import REPRESENTATIVES, every_method
from helpers.short_fit import LOG_EVERY, syncs_per_step


def assert_syncs_only_on_logger_steps(per_step: dict[int, dict]) -> None:
    logger_steps = {step for step in per_step if (step + 1) % LOG_EVERY == 0}
    assert logger_steps == {2, 5}
    syncing = {step: seen for step, seen in per_step.items() if step not in logger_steps and seen}
    assert not syncing, f"host syncs outside logger steps: {syncing}"


@pytest.mark.parametrize("name", every_method())
def test_training_steps_between_logger_steps_make_no_host_sync(name, short_fit):
    per_step = short_fit(name).syncs_per_step  # bf16-mixed, labelled, LARS (helpers/short_fit.py)
    assert_syncs_only_on_logger_steps(per_step)
    # The counter does see the reads that logging needs: the guard's check and the accuracy sums.
    assert all(per_step[step] for step in (2, 5))


@pytest.mark.parametrize("name", sorted(REPRESENTATIVES.values()))
def test_unlabelled_steps_make_no_host_sync_either(name, tmp_path):
    model = tiny_method(name, in_chans=1, num_classes=4, batch_size=8, optimizer="lars", lr=0.3)
    assert_syncs_only_on_logger_steps(syncs_per_step(model, tmp_path, labelled=False)[1])


def test_mixup_and_cutmix_steps_make_no_host_sync(tmp_path):
    model = tiny_method("Classifier", in_chans=1, num_classes=4, batch_size=8, mixup_alpha=0.8, cutmix_alpha=1.0)
    assert_syncs_only_on_logger_steps(syncs_per_step(model, tmp_path)[1])


def test_finetune_steps_make_no_host_sync(method_checkpoint, tmp_path):
    model = FineTune(pretrained=str(method_checkpoint), in_chans=1, num_classes=4, batch_size=8)
    assert_syncs_only_on_logger_steps(syncs_per_step(model, tmp_path)[1])


def test_device_views_on_an_accelerator_make_no_host_sync(monkeypatch):
    # The accelerator path (blending instead of indexing), run here on CPU tensors.
    monkeypatch.setattr(device_views, "blends_selections", lambda device: True)
    views = DeviceViews(resolve_views("simclr", 32, 3), mean=(0.5,) * 3, std=(0.5,) * 3)
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    counter = HostSyncCounter()
    counter.counting = True
    with counter:
        out = views(images, torch.Generator().manual_seed(0))
    assert len(out) == 2 and counter.total() == 0, dict(counter.seen)


def test_progress_bar_reads_metrics_at_most_once_per_interval(tmp_path):
    class CountReads(ThrottledProgressBar):
        reads = 0

        def get_metrics(self, trainer, pl_module):
            before = self._read_at
            shown = super().get_metrics(trainer, pl_module)
            CountReads.reads += self._read_at != before
            return shown

    model = tiny_method("SimCLR", in_chans=1, batch_size=8)
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, limit_train_batches=5, enable_checkpointing=False,
                        enable_model_summary=False, logger=False, callbacks=[CountReads(metrics_every_s=3600)])
    trainer.fit(model, fake_loader(batch_size=8, length=64, size=16))
    # Ten steps, but the metrics were read only at the two epoch ends, so the bar ends on the last loss.
    assert CountReads.reads == 2
    assert trainer.progress_bar_callback._shown["train/loss"] == pytest.approx(float(trainer.callback_metrics["train/loss"]))
