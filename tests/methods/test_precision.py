"""``precision="bf16-mixed"`` on the CPU: bfloat16 heads under autocast, float32 losses and weights."""

import lightning as L
import pytest
import torch

from helpers.fakes import fake_loader, tiny_method
from helpers.registry import every_method, first_head


class RecordDtypes(L.Callback):
    """The first head's output dtype (did autocast run?) and the returned loss's dtype, per step."""

    def on_train_start(self, trainer, pl_module):
        self.head_dtypes, self.loss_dtypes = [], []
        first_head(pl_module).register_forward_hook(lambda module, args, out: self.head_dtypes.append(out.dtype))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.loss_dtypes.append(outputs["loss"].dtype)


@pytest.mark.parametrize("name", every_method())
def test_bf16_mixed_fit_keeps_float32_losses_and_weights(name):
    model = tiny_method(name, in_chans=1, num_classes=4, batch_size=8)
    recorder = RecordDtypes()
    trainer = L.Trainer(accelerator="cpu", precision="bf16-mixed", max_steps=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[recorder])
    trainer.fit(model, fake_loader(size=16))
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert set(recorder.head_dtypes) == {torch.bfloat16}
    # The losses compute in float32 under autocast (see ssl_lightning/losses); the probe's
    # cross-entropy is float32 under autocast too.
    assert recorder.loss_dtypes == [torch.float32, torch.float32]
    assert {p.dtype for p in model.parameters()} == {torch.float32}
