"""What NNCLR promises beyond its family: each step the support queue receives the normalised
projections of view 1, in order, and a queue that does not fit the data fails at fit start."""

import pytest
import torch
import torch.nn.functional as F

from ssl_lightning.datamodules import Digits
from ssl_lightning.methods.ssl.nnclr import NNCLR

from helpers.fakes import fake_loader, quick_trainer, tiny_method


def test_queue_receives_the_view_one_projections_of_every_step():
    model = tiny_method(NNCLR, in_chans=1, num_classes=4, batch_size=8)
    model.configure_model()  # so that the queue's initial rows can be read before training
    initial = model.queue.features.clone()
    projections = []  # the projector runs on view 1, then on view 2, each step
    model.projector.register_forward_hook(lambda module, inputs, output: projections.append(output.detach().clone()))

    quick_trainer(max_steps=3, limit_val_batches=0).fit(model, fake_loader(batch_size=8, length=64))

    view_one = [F.normalize(projections[2 * step], dim=1) for step in range(3)]
    torch.testing.assert_close(model.queue.features[:24], torch.cat(view_one))
    assert torch.equal(model.queue.features[24:], initial[24:])
    assert int(model.queue.position) == 24


@pytest.mark.parametrize(
    "queue_size, match",
    [(48, "queue size 48 is not divisible by the global batch 32"),
     (2048, r"queue size 2048 is larger than the training set \(1437 images\)")],
)
def test_a_queue_that_does_not_fit_the_data_fails_at_fit_start(queue_size, match):
    model = tiny_method(NNCLR, queue_size=queue_size, in_chans=1, num_classes=10, batch_size=32)
    with pytest.raises(ValueError, match=f"NNCLR: the {match}"):
        quick_trainer(max_steps=1).fit(model, Digits(batch_size=32, num_workers=0))
