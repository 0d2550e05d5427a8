import lightning as L
import pytest
from lightning.pytorch.demos.boring_classes import BoringModel

from ssl_lightning.callbacks import ProgressLines


class LogsLoss(BoringModel):
    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        self.log("train/loss", out["loss"], prog_bar=True)
        return out


def fit_lines(tmp_path, capsys, progress: ProgressLines, epochs: int = 2) -> list[str]:
    trainer = L.Trainer(
        max_epochs=epochs, limit_train_batches=3, limit_val_batches=1, callbacks=[progress], logger=False,
        enable_checkpointing=False, enable_model_summary=False, default_root_dir=tmp_path,
    )
    trainer.fit(LogsLoss())
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("Epoch ")]


def test_one_line_per_epoch_with_step_and_metrics(tmp_path, capsys):
    lines = fit_lines(tmp_path, capsys, ProgressLines(every_s=None))
    assert [line.split(" | ")[:2] for line in lines] == [["Epoch 0/1 end", "step 3"], ["Epoch 1/1 end", "step 6"]]
    assert all("train/loss=" in line and "v_num" not in line for line in lines)


def test_lines_within_an_epoch_at_most_every_interval(tmp_path, capsys):
    lines = fit_lines(tmp_path, capsys, ProgressLines(every_s=0), epochs=1)
    assert [line.split(" | ")[0] for line in lines] == [
        "Epoch 0/0 batch 1/3", "Epoch 0/0 batch 2/3", "Epoch 0/0 batch 3/3", "Epoch 0/0 end"]


def test_disabled_progress_writes_nothing(tmp_path, capsys):
    progress = ProgressLines(every_s=0)
    progress.disable()
    assert fit_lines(tmp_path, capsys, progress, epochs=1) == []


def test_negative_interval_is_refused():
    with pytest.raises(ValueError, match="every_s must be >= 0"):
        ProgressLines(every_s=-1)
