"""What MSBReg promises beyond its family: BYOL's EMA target of backbone and projector, the loss as the
sum of its three weighted terms over 2 to 8 views, Brownian directions that give every particle its own
draw (two ranks draw what one process draws); and the singular value regulariser that ``SSLMethod``
offers every method: exactly ``weight x singular_value_loss(embeds)`` added, a clear error where a
method returns no embeddings."""

import math

import lightning as L
import pytest
import torch

from ssl_lightning.core.data_link import check_view_count
from ssl_lightning.losses import brownian_diffusive_loss, multiview_centroid_loss, singular_value_loss
from ssl_lightning.methods import FAMILIES
from ssl_lightning.methods.ssl import msbreg
from ssl_lightning.methods.ssl.msbreg import MSBReg

from helpers.fakes import fake_loader, quick_trainer, tiny_method

#: the self-supervised methods whose shared_step has no natural embedding to return (a DINO head's
#: logits, MAE's pixels): the regulariser refuses them
WITHOUT_EMBEDS = {"DINO", "IBOT", "RandomTeachers", "MAE", "SelfDistilledMAE"}


def fewest_views(cls) -> int:
    return cls.expected_views if isinstance(cls.expected_views, int) else cls.expected_views[0]


def tiny_msbreg(**kwargs):
    model = tiny_method(MSBReg, in_chans=1, num_classes=4, batch_size=8, **kwargs)
    model.configure_model()
    return model


@pytest.mark.parametrize("num_views", [2, 3, 8])
def test_loss_is_the_centroid_plus_the_weighted_brownian_and_singular_value_terms(num_views):
    torch.manual_seed(0)
    model = tiny_msbreg(brownian_weight=0.3, singular_value_weight=0.7)
    batch = next(iter(fake_loader(size=16, num_views=num_views)))
    torch.manual_seed(1)
    out = model.shared_step(batch)

    torch.manual_seed(1)  # the forward passes draw nothing: the same Brownian directions again
    views = batch["views"]
    projections = [model.projector(model.backbone(view)) for view in views]
    predictions = torch.stack([model.predictor(p) for p in projections])
    targets = torch.stack([model.teacher(view) for view in views])
    particles = torch.cat(projections)
    directions = model.brownian_directions(num_views, 8, projections[0].shape[1])
    expected = {"loss/centroid": multiview_centroid_loss(predictions, targets),
                "loss/brownian": brownian_diffusive_loss(particles, directions),
                "loss/singular_value": singular_value_loss(particles)}
    for name, value in expected.items():
        torch.testing.assert_close(out[name], value.detach())
    torch.testing.assert_close(out["loss"], expected["loss/centroid"] + 0.3 * expected["loss/brownian"]
                               + 0.7 * expected["loss/singular_value"])
    assert out["embeds"].shape == (num_views * 8, projections[0].shape[1]) and out["feats"].shape[0] == 8


def test_the_loss_reaches_the_online_network_and_never_the_target():
    model = tiny_msbreg()
    model.shared_step(next(iter(fake_loader(size=16, num_views=4))))["loss"].backward()
    for module in (model.backbone, model.projector, model.predictor):
        # any, not all: timm zero-initialises each residual branch's last BatchNorm (no gradient at first)
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    assert not any(p.requires_grad for p in model.teacher.parameters())


class StudentAfterEachStep(L.Callback):
    """The student (backbone + projector) after every optimizer step, and before the first."""

    def on_train_start(self, trainer, pl_module):
        self.initial = {k: v.clone() for k, v in pl_module._online_network().state_dict().items()}
        self.after_step = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after_step.append({k: v.clone() for k, v in pl_module._online_network().state_dict().items()})


def test_the_target_is_the_closed_form_ema_of_backbone_and_projector():
    torch.manual_seed(0)
    model = tiny_method(MSBReg, in_chans=1, num_classes=4, batch_size=8, base_momentum=0.9, optimizer="sgd", lr=0.5)
    recorder = StudentAfterEachStep()
    trainer = quick_trainer(max_steps=4, callbacks=[recorder])
    trainer.fit(model, fake_loader(batch_size=8, length=32, size=16, num_views=4))

    student = model._online_network()
    assert {id(p) for p in student.parameters()} == {id(p) for p in (*model.backbone.parameters(),
                                                                       *model.projector.parameters())}
    assert not any(p.requires_grad for p in model.teacher.parameters())
    expected = recorder.initial
    for k, after in enumerate(recorder.after_step):  # BYOL's cosine schedule of the momentum, 0.9 -> 1
        m = 1 - (1 - 0.9) * (math.cos(math.pi * k / 4) + 1) / 2
        expected = {key: m * value + (1 - m) * after[key] if value.is_floating_point() else after[key]
                    for key, value in expected.items()}
    for key, value in model.teacher.module.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-6, msg=key)


def test_takes_two_to_eight_views():
    for views in (2, 4, 8):
        check_view_count("MSBReg", MSBReg.expected_views, views)
    for views in (1, 9):
        with pytest.raises(ValueError, match=r"MSBReg needs 2 to 8 views per image"):
            check_view_count("MSBReg", MSBReg.expected_views, views)


def test_brownian_directions_are_one_draw_per_particle_that_two_ranks_share_out(monkeypatch):
    model = tiny_msbreg()
    torch.manual_seed(3)
    whole = model.brownian_directions(3, 8, 5)  # view-major: [view 0's 8 images, view 1's, view 2's]
    assert whole.shape == (24, 5) and torch.linalg.matrix_rank(whole).item() == 5
    monkeypatch.setattr(msbreg, "world_size", lambda: 2)
    for rank in (0, 1):
        monkeypatch.setattr(msbreg, "rank", lambda rank=rank: rank)
        torch.manual_seed(3)  # the same RNG state on both ranks, as seed_everything leaves it
        shard = model.brownian_directions(3, 4, 5)
        expected = whole.view(3, 8, 5)[:, 4 * rank : 4 * rank + 4].flatten(0, 1)
        assert torch.equal(shard, expected)


def test_weights_are_checked():
    with pytest.raises(ValueError, match="MSBReg: brownian_weight must be >= 0"):
        MSBReg(brownian_weight=-0.1)
    with pytest.raises(ValueError, match="MSBReg: singular_value_weight must be a finite number >= 0"):
        MSBReg(singular_value_weight=math.nan)


# ----------------------------------------------------------------- the regulariser on other methods
def test_the_option_adds_exactly_weight_times_the_singular_value_loss_of_the_embeddings():
    batch = next(iter(fake_loader(size=16)))
    outputs = {}
    for weight in (0.0, 0.3):
        torch.manual_seed(0)  # the same initial weights
        model = tiny_method("SimCLR", in_chans=1, num_classes=4, batch_size=8, singular_value_weight=weight)
        model.configure_model()
        outputs[weight] = model.shared_step(batch)
    plain, regularised = outputs[0.0], outputs[0.3]
    assert "loss/singular_value" not in plain
    term = singular_value_loss(plain["embeds"])
    torch.testing.assert_close(regularised["loss"], plain["loss"] + 0.3 * term, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(regularised["loss/singular_value"], term.detach())
    assert not regularised["loss/singular_value"].requires_grad


def test_the_regulariser_is_logged_as_a_loss_term():
    model = tiny_method("BYOL", in_chans=1, num_classes=4, batch_size=8, singular_value_weight=1.0)
    trainer = quick_trainer(max_steps=2, log_every_n_steps=1)
    trainer.fit(model, fake_loader(batch_size=8, length=16, size=16))
    assert -1.0 <= float(trainer.callback_metrics["train/loss/singular_value"]) < 0


@pytest.mark.parametrize("name", sorted(FAMILIES["ssl"]))
def test_every_method_either_regularises_its_embeddings_or_says_it_has_none(name):
    cls = FAMILIES["ssl"][name]
    model = tiny_method(name, in_chans=1, num_classes=4, batch_size=8, singular_value_weight=0.5)
    model.configure_model()
    batch = next(iter(fake_loader(size=16, num_views=fewest_views(cls))))
    if name in WITHOUT_EMBEDS:
        with pytest.raises(ValueError, match=rf"{name}: singular_value_weight=0.5 .* {name}.shared_step returns none"):
            model.shared_step(batch)
        return
    out = model.shared_step(batch)
    assert out["embeds"].shape[0] % 8 == 0 and out["embeds"].requires_grad
    torch.testing.assert_close(out["loss/singular_value"], singular_value_loss(out["embeds"]).detach())


def test_a_method_without_embeddings_stops_at_its_first_step_naming_itself():
    model = tiny_method("RandomTeachers", in_chans=1, num_classes=4, batch_size=8, singular_value_weight=0.1)
    with pytest.raises(ValueError, match=r"RandomTeachers: singular_value_weight=0.1 .* Set singular_value_weight: 0"):
        L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False).fit(
            model, fake_loader(batch_size=8, length=16, size=16, num_views=1))
