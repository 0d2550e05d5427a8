"""Device-side views in tests: a first training batch drawn on the device, and the tolerance of compiled views."""

import torch

from ssl_lightning.datamodules import Digits

STD = 0.25


def assert_same_views(drawn: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    """Equal to float rounding, except where a pixel sits on solarize's threshold and the rounding of
    the ops before flips it (a jump of 1/255 on the [0, 1] scale): at most 1 element in 10,000."""
    assert len(drawn) == len(expected)
    for a, b in zip(drawn, expected):
        difference = (a - b).abs()
        assert (difference > 2e-4).float().mean() <= 1e-4, difference.max()
        assert difference.max() <= 1 / 255 / STD + 2e-4


class Training:
    """Stands in for the Trainer in on_after_batch_transfer, which only draws views while training."""

    training = True


def first_training_batch(**kwargs) -> dict:
    datamodule = Digits(batch_size=16, num_workers=2, seed=3, view_device="device", **kwargs)
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    batch = datamodule.on_before_batch_transfer(next(iter(loader)), 0)
    datamodule.trainer = Training()
    return loader, datamodule.on_after_batch_transfer(batch, 0)
