"""StageFeatures: the stage maps come from the backbone's one forward pass, with their graph."""

import pytest
import torch

from ssl_lightning.backbones import build_backbone
from ssl_lightning.components.stage_features import StageFeatures, stage_module_names

from helpers.fakes import TINY_BACKBONE


def tiny_resnet():
    torch.manual_seed(0)
    return build_backbone(TINY_BACKBONE["backbone"], cifar_stem=True, in_chans=1, kwargs=TINY_BACKBONE["backbone_kwargs"])


def test_timm_and_torchvision_resnets_name_their_four_stages_without_the_stem():
    assert stage_module_names(tiny_resnet()) == ["layer1", "layer2", "layer3", "layer4"]
    assert stage_module_names(build_backbone("torchvision.resnet18")) == ["layer1", "layer2", "layer3", "layer4"]
    vit = build_backbone("vit_tiny_patch16_224", kwargs={"img_size": 16, "patch_size": 4, "depth": 2})
    assert stage_module_names(vit) == ["blocks.0", "blocks.1"]


def test_maps_equal_the_stages_run_by_hand_and_features_equal_the_plain_forward():
    backbone = tiny_resnet().eval()
    images = torch.randn(3, 1, 16, 16)
    feats, maps = StageFeatures(backbone, [1, -1])(images)
    torch.testing.assert_close(feats, backbone(images), rtol=0, atol=0)
    x = backbone.act1(backbone.bn1(backbone.conv1(images)))
    layer2 = backbone.layer2(backbone.layer1(x))
    torch.testing.assert_close(maps[0], layer2, rtol=0, atol=0)
    torch.testing.assert_close(maps[1], backbone.layer4(backbone.layer3(layer2)), rtol=0, atol=0)
    assert StageFeatures(backbone, [0, 1, 2, 3]).channels(1, 16) == [8, 16, 32, 64]


def test_a_loss_on_a_stage_map_trains_only_the_layers_below_it():
    backbone = tiny_resnet()
    _, (layer2,) = StageFeatures(backbone, ["layer2"])(torch.randn(2, 1, 16, 16))
    layer2.square().mean().backward()
    assert backbone.conv1.weight.grad.abs().sum() > 0
    assert backbone.layer3[0].conv1.weight.grad is None


def test_unknown_stages_and_stageless_backbones_are_refused_with_the_choices():
    with pytest.raises(ValueError, match="stages are"):
        StageFeatures(tiny_resnet(), ["layer9"])
    with pytest.raises(ValueError, match="declares no stages"):
        stage_module_names(torch.nn.Sequential(torch.nn.Flatten()))


def test_a_deep_copy_catches_into_its_own_store_and_plain_forwards_keep_nothing():
    import copy
    import pickle

    backbone = tiny_resnet().eval()
    tap = StageFeatures(backbone, ["layer2"])
    backbone(torch.randn(2, 1, 16, 16))
    assert tap._store["maps"] == {}  # a forward outside a tap keeps no map (and no graph)
    copied_backbone, copied_tap = copy.deepcopy((backbone, tap))
    with torch.no_grad():
        copied_backbone.conv1.weight.add_(1.0)
    images = torch.randn(2, 1, 16, 16)
    (_, (ours,)), (_, (theirs,)) = tap(images), copied_tap(images)
    assert not torch.allclose(ours, theirs)  # each tap reads its own backbone's map
    restored_backbone, restored_tap = pickle.loads(pickle.dumps((backbone, tap)))
    torch.testing.assert_close(restored_tap(images)[1][0], ours, rtol=0, atol=0)


def test_transformer_stages_report_their_token_width():
    vit = build_backbone("vit_tiny_patch16_224", kwargs={"img_size": 16, "patch_size": 4, "depth": 2})
    assert StageFeatures(vit, [0, 1]).channels(3, 16) == [192, 192]
