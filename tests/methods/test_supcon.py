import pytest
import torch

from ssl_lightning.datamodules import Digits
from ssl_lightning.methods.ssl.simclr import SimCLR
from ssl_lightning.methods.ssl.supcon import SupCon

from helpers.fakes import fake_loader, quick_trainer, tiny_method


class UnlabelledDigits(Digits):
    """Digits as a DataModule without classes, like an unlabelled image folder."""

    @property
    def num_classes(self) -> None:
        return None


def test_fitting_without_classes_names_the_datamodule_and_the_fix():
    with pytest.raises(ValueError, match="SupCon needs labelled data: the DataModule UnlabelledDigits has no classes.*SimCLR"):
        quick_trainer(max_steps=1).fit(tiny_method(SupCon), UnlabelledDigits(batch_size=32, num_workers=0))


def test_one_step_on_digits_trains_and_probes():
    model = tiny_method(SupCon, optimizer="adamw", lr=1e-3)
    trainer = quick_trainer(max_steps=1, limit_val_batches=0)
    trainer.fit(model, Digits(batch_size=32, num_workers=0))
    assert model.hparams.num_classes == 10 and model.probe is not None
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_an_unlabelled_batch_gives_simclrs_loss():
    torch.manual_seed(0)
    supcon = tiny_method(SupCon, in_chans=1, num_classes=4, batch_size=8)
    simclr = tiny_method(SimCLR, in_chans=1, num_classes=4, batch_size=8)
    for model in (supcon, simclr):
        model.configure_model()
    simclr.load_state_dict(supcon.state_dict())
    batch = next(iter(fake_loader(batch_size=8, size=16)))
    labelled = supcon.shared_step(batch)["loss"]
    batch["label"] = torch.full_like(batch["label"], -1)
    torch.testing.assert_close(supcon.shared_step(batch)["loss"], simclr.shared_step(batch)["loss"])
    assert not torch.allclose(labelled, simclr.shared_step(batch)["loss"])  # fake labels repeat: 8 images, 4 classes
