"""SimSiam (Chen and He, CVPR 2021): the loss is -1/2 cos(p1, sg(z2)) - 1/2 cos(p2, sg(z1)), so no
gradient reaches the target branch; the predictor trains at a fixed LR; the paper's head shapes."""

import lightning as L
import pytest
import torch
from torch import nn

from ssl_lightning.methods.ssl.simsiam import SimSiam

from helpers.fakes import fake_loader, quick_trainer, tiny_method


def capture_predictor_calls(model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input z, output p) of every predictor call, in order: view 1, then view 2."""
    calls = []
    model.predictor.register_forward_hook(lambda module, inputs, output: calls.append((inputs[0], output)))
    return calls


def plain_cosine(a, b):
    return torch.stack([(x @ y) / (x.norm() * y.norm()) for x, y in zip(a, b)]).mean()


def test_loss_is_the_symmetrised_negative_cosine_and_stops_the_target_gradient():
    model = tiny_method(SimSiam, in_chans=1)
    model.configure_model()
    model.double()
    batch = next(iter(fake_loader(batch_size=6)))
    batch["views"] = [view.double() for view in batch["views"]]
    calls = capture_predictor_calls(model)
    loss = model.shared_step(batch)["loss"]
    (z1, p1), (z2, p2) = calls

    # The paper's eq. 2: L = 1/2 D(p1, z2) + 1/2 D(p2, z1), D = -cos.
    torch.testing.assert_close(loss, -0.5 * plain_cosine(p1, z2) - 0.5 * plain_cosine(p2, z1), rtol=1e-10, atol=1e-12)

    # z1 reaches the loss through p1 = h(z1) only: its gradient is the vector-Jacobian product of the
    # predictor with dL/dp1, with nothing from the target term D(p2, sg(z1)).
    grad_z1, grad_p1 = torch.autograd.grad(loss, (z1, p1), retain_graph=True)
    (through_predictor,) = torch.autograd.grad(p1, z1, grad_outputs=grad_p1, retain_graph=True)
    torch.testing.assert_close(grad_z1, through_predictor, rtol=1e-10, atol=1e-12)
    # Without the stop-gradient the target term would add -1/2 d cos(p2, z1) / d z1, which is not zero.
    target_term = torch.autograd.grad(-0.5 * plain_cosine(p2, z1), z1, retain_graph=True)[0]
    assert target_term.abs().max() > 1e-6


def test_heads_have_the_paper_shapes():
    model = SimSiam()
    model.build_heads(512)  # a ResNet-18's features
    projector_linears = [m for m in model.projector if isinstance(m, nn.Linear)]
    assert [tuple(m.weight.shape) for m in projector_linears] == [(2048, 512), (2048, 2048), (2048, 2048)]
    assert all(m.bias is None for m in projector_linears)  # each is followed by a BatchNorm
    norms = [m for m in model.projector if isinstance(m, nn.BatchNorm1d)]
    assert len(norms) == 3 and [m.affine for m in norms] == [True, True, False]
    assert not isinstance(model.projector[-2], nn.ReLU)  # the output fc has BN, no ReLU
    predictor_linears = [m for m in model.predictor if isinstance(m, nn.Linear)]
    assert [tuple(m.weight.shape) for m in predictor_linears] == [(512, 2048), (2048, 512)]
    assert isinstance(model.predictor[-1], nn.Linear)  # the predictor's output has no BN or ReLU


def test_paper_optimizer_defaults():
    hp = SimSiam().hparams
    assert (hp.optimizer, hp.lr, hp.weight_decay, hp.momentum, hp.warmup_epochs, hp.schedule) == (
        "sgd", 0.05, 1e-4, 0.9, 0.0, "warmup_cosine"
    )


class RecordLearningRates(L.Callback):
    def __init__(self):
        self.per_step: list[dict[str, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.per_step.append({g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups})


@pytest.mark.parametrize("fixed", [True, False])
def test_predictor_keeps_its_peak_lr_through_a_fit(fixed):
    model = tiny_method(SimSiam, in_chans=1, num_classes=4, batch_size=8, warmup_steps=2, fixed_predictor_lr=fixed)
    recorder = RecordLearningRates()
    quick_trainer(max_steps=6, callbacks=[recorder]).fit(model, train_dataloaders=fake_loader(batch_size=8, length=64))
    peak = 0.05 * 8 / 256
    backbone_lrs = [step["weights"] for step in recorder.per_step]
    assert len(set(backbone_lrs)) > 2 and max(backbone_lrs) == pytest.approx(peak)  # warm-up, then cosine
    groups = recorder.per_step[0]
    if not fixed:
        assert not any(name.startswith("predictor") for name in groups)
        return
    assert {"predictor_weights", "predictor_no_decay"} <= set(groups)
    for step in recorder.per_step:
        assert step["predictor_weights"] == pytest.approx(peak) and step["predictor_no_decay"] == pytest.approx(peak)

    # Every trainable parameter is in exactly one group; the predictor's only in its own.
    params = [id(p) for group in model.trainer.optimizers[0].param_groups for p in group["params"]]
    assert len(params) == len(set(params)) == sum(p.requires_grad for p in model.parameters())
    predictor_ids = {id(p) for p in model.predictor.parameters()}
    for group in model.trainer.optimizers[0].param_groups:
        in_predictor = {id(p) in predictor_ids for p in group["params"]}
        assert in_predictor == {group["name"].startswith("predictor")}
