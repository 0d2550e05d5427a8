"""What MoCo v3 promises beyond its family: the momentum encoder follows the online backbone and
projector on EMATeacher's cosine schedule, the official heads per architecture, and a frozen random
patch embedding for ViTs (and a clear error without one)."""

import pytest
import torch

from ssl_lightning.components.teacher import EMATeacher
from ssl_lightning.methods.ssl.moco_v3 import MoCoV3
from ssl_lightning.optim import cosine_momentum

from helpers.fakes import TINY_VIT, fake_loader, quick_trainer, tiny_method


def test_momentum_encoder_follows_the_online_network_on_the_cosine_schedule(monkeypatch):
    updates = []
    original = EMATeacher.update

    def recording_update(self, student, momentum):
        updates.append((student, momentum))
        original(self, student, momentum)

    monkeypatch.setattr(EMATeacher, "update", recording_update)
    model = tiny_method(MoCoV3, in_chans=1, num_classes=4, batch_size=8)
    quick_trainer(max_steps=4).fit(model, fake_loader(batch_size=8, length=64))

    assert [momentum for _, momentum in updates] == [cosine_momentum(k, 4, 0.99, 1.0) for k in range(4)]
    online = {id(p) for p in (*model.backbone.parameters(), *model.projector.parameters())}
    for student, _ in updates:  # backbone and projector, not the predictor
        assert {id(p) for p in student.parameters()} == online
    assert not any(p.requires_grad for p in model.teacher.parameters())


def test_official_heads_per_architecture():
    resnet = tiny_method(MoCoV3, in_chans=1)
    resnet.configure_model()
    vit = tiny_method(MoCoV3, backbone=TINY_VIT, in_chans=1, image_size=16)
    vit.configure_model()
    for model, proj_layers, pred_last_bn in ((resnet, 2, False), (vit, 3, True)):
        linears = [m for m in model.projector if isinstance(m, torch.nn.Linear)]
        assert len(linears) == proj_layers and all(m.bias is None for m in linears)
        assert isinstance(model.projector[-1], torch.nn.BatchNorm1d) and not model.projector[-1].affine
        assert isinstance(model.predictor[-1], torch.nn.BatchNorm1d) == pred_last_bn


def test_freeze_patch_embed_freezes_exactly_the_patch_embedding():
    model = tiny_method(MoCoV3, backbone=TINY_VIT, in_chans=1, num_classes=4, batch_size=8,
                        freeze_patch_embed=True, optimizer="adamw", lr=1e-3)
    model.configure_model()
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad and not name.startswith("teacher.")}
    assert frozen == {f"backbone.{name}" for name, _ in model.backbone.named_parameters() if name.startswith("patch_embed.")}
    assert frozen  # the tiny ViT has a patch projection
    grouped = {id(p) for group in model.parameter_groups() for p in group["params"]}
    assert not any(id(p) in grouped for p in model.backbone.patch_embed.parameters())

    before = {name: p.detach().clone() for name, p in model.backbone.named_parameters()}
    quick_trainer(max_steps=2).fit(model, fake_loader(batch_size=8, length=64, size=16))
    for name, p in model.backbone.named_parameters():
        assert torch.equal(p, before[name]) == name.startswith("patch_embed."), name


def test_freeze_patch_embed_without_a_vit_is_a_clear_error():
    model = tiny_method(MoCoV3, in_chans=1, freeze_patch_embed=True)
    with pytest.raises(ValueError, match=r"freeze_patch_embed=True\) needs a ViT backbone with a `patch_embed`.*ResNet"):
        model.configure_model()
