"""A real two-process fit: Lightning ddp_spawn on the CPU (gloo) with the quickstart's settings.

Plain "ddp" would re-launch the whole pytest session, so the strategy is always ddp_spawn here.
"""

import csv
import json
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.loggers import CSVLogger

from ssl_lightning.datamodules import Digits
from ssl_lightning.datamodules.views import ViewSpec
from ssl_lightning.methods import SimCLR

from helpers.fakes import TINY_BACKBONE, FakeViews

BATCH_SIZE, DEVICES, LR = 32, 2, 2.0e-3


class LossRecordingSimCLR(SimCLR):
    """Keeps the NT-Xent value of the step (the returned loss also holds the rank-local probe loss)
    and the online probe's correct and labelled counts on this rank, before its update."""

    def shared_step(self, batch: dict) -> dict:
        out = super().shared_step(batch)
        self.last_ssl_loss = float(out["loss"])
        return out

    def training_extras(self, batch, out, logs_now):
        labels = batch["label"]
        labelled = labels >= 0
        with torch.no_grad():
            hits = (self.probe(out["feats"]).argmax(1) == labels)[labelled]
            self.last_probe_counts = [int(hits.sum()), int(labelled.sum())]
        return super().training_extras(batch, out, logs_now)


class RecordRanks(L.Callback):
    """Each rank writes what it saw to its own file (ddp_spawn returns nothing else to the parent)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx != 0:
            return
        record = {
            "world_size": dist.get_world_size() if dist.is_initialized() else 1,
            "backend": dist.get_backend() if dist.is_initialized() else None,
            "local_batch": batch["views"][0].shape[0],
            "peak_lr": {g["name"]: g["initial_lr"] for g in trainer.optimizers[0].param_groups},
            "ssl_loss": pl_module.last_ssl_loss,
            "probe_counts": pl_module.last_probe_counts,
        }
        (self.directory / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


@pytest.mark.ddp
@pytest.mark.timeout(240)
def test_ddp_spawn_fit_on_two_cpu_processes(tmp_path):
    model = LossRecordingSimCLR(
        temperature=0.2, proj_hidden_dim=64, proj_dim=32, optimizer="adamw", lr=LR, lr_scaling="linear",
        weight_decay=1e-4, warmup_steps=0, probe_lr=LR, **TINY_BACKBONE,
    )
    # The quickstart's digit views: no flips, crops of at least 30 %, no colour ops that need RGB.
    views = [ViewSpec(num=2, crop_scale=(0.3, 1.0), flip_p=0.0, saturation=0.0, hue=0.0, grayscale_p=0.0)]
    data = Digits(batch_size=BATCH_SIZE, num_workers=0, views=views)
    trainer = L.Trainer(
        accelerator="cpu", devices=DEVICES, strategy="ddp_spawn", max_epochs=1, limit_train_batches=2,
        limit_val_batches=2, log_every_n_steps=1, logger=CSVLogger(tmp_path, name="logs"),
        callbacks=[RecordRanks(tmp_path)], enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(model, data)

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(DEVICES)]
    assert [r["world_size"] for r in ranks] == [DEVICES, DEVICES]
    assert {r["backend"] for r in ranks} == {"gloo"}
    assert [r["local_batch"] for r in ranks] == [BATCH_SIZE, BATCH_SIZE]
    # NT-Xent gathers the global batch: every rank computes the same loss value.
    assert ranks[0]["ssl_loss"] == pytest.approx(ranks[1]["ssl_loss"], rel=1e-5)
    scaled = LR * BATCH_SIZE * DEVICES / 256  # linear scaling by the global batch
    for record in ranks:
        assert record["peak_lr"]["weights"] == pytest.approx(scaled)
        assert record["peak_lr"]["probe"] == pytest.approx(scaled)

    metrics_files = list(tmp_path.rglob("metrics.csv"))
    assert len(metrics_files) == 1, "only rank zero writes the logger's files"
    with metrics_files[0].open() as f:
        rows = list(csv.DictReader(f))
    columns = set(rows[0])
    assert {"train/loss", "lr/weights", "lr/probe", "val/probe_top1", "epoch", "step"} <= columns
    logged_lr = [float(row["lr/weights"]) for row in rows if row["lr/weights"]]
    assert logged_lr and max(logged_lr) == pytest.approx(scaled)
    assert all(torch.isfinite(torch.tensor(float(row["train/loss"]))) for row in rows if row["train/loss"])
    # The probe's training accuracy counts every labelled image of both ranks once.
    hits, labelled = (sum(r["probe_counts"][i] for r in ranks) for i in (0, 1))
    first = next(row for row in rows if row["step"] == "0" and row["train/probe_top1"])
    assert float(first["train/probe_top1"]) == pytest.approx(hits / labelled)


class UnlabelledOnRankOne(torch.utils.data.Dataset):
    """Labelled images on rank 0, only unlabelled ones (-1) on rank 1 (the dataset runs in each rank's process)."""

    def __init__(self, length: int = 64):
        self.views = FakeViews(length=length)

    def __len__(self) -> int:
        return len(self.views)

    def __getitem__(self, i: int) -> dict:
        item = self.views[i]
        return {**item, "label": -1} if dist.get_rank() == 1 else item


@pytest.mark.ddp
@pytest.mark.timeout(240)
def test_a_rank_without_labels_still_trains_the_probe_with_the_others(tmp_path):
    # Selecting the labelled rows would leave rank 1's probe out of its graph, and DDP (which
    # expects every parameter to get a gradient) would fail at the next step; the masked loss
    # keeps the probe in every rank's graph, with zero gradient where nothing is labelled.
    model = LossRecordingSimCLR(**TINY_BACKBONE, proj_hidden_dim=32, proj_dim=16, optimizer="adamw", lr=1e-3,
                                in_chans=1, num_classes=4, batch_size=8)
    trainer = L.Trainer(accelerator="cpu", devices=DEVICES, strategy="ddp_spawn", max_steps=3, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[RecordRanks(tmp_path)])
    trainer.fit(model, torch.utils.data.DataLoader(UnlabelledOnRankOne(), batch_size=8))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(DEVICES)]
    assert [r["probe_counts"][1] for r in ranks] == [8, 0]  # labelled images of each rank's first batch
