import pytest
import torch
from torch import nn

from ssl_lightning.backbones import (
    build_backbone,
    enable_grad_checkpointing,
    feature_dim,
)


def test_timm_resnet_with_cifar_stem_and_one_channel():
    model = build_backbone("resnet18", cifar_stem=True, in_chans=1)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    out = model(torch.randn(2, 1, 32, 32))
    assert out.shape == (2, 512) == (2, feature_dim(model))


def test_timm_kwargs_build_a_small_resnet():
    model = build_backbone("resnet18", kwargs={"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64]})
    assert feature_dim(model) == 64
    assert len(model.layer1) == 1


def test_torchvision_resnet_head_removed():
    model = build_backbone("torchvision.resnet18", in_chans=1, cifar_stem=True)
    assert isinstance(model.fc, nn.Identity)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 512)


def test_custom_module_feature_dim_is_measured():
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    assert feature_dim(model, in_chans=3, image_size=16) == 5


def test_custom_module_with_spatial_output_is_rejected():
    with pytest.raises(ValueError, match=r"must return \[batch, features\].*\(2, 5, 14, 14\)"):
        feature_dim(nn.Conv2d(3, 5, 3), in_chans=3, image_size=16)


def test_unknown_backbone_name():
    with pytest.raises(ValueError, match="Unknown backbone 'resnet_does_not_exist'"):
        build_backbone("resnet_does_not_exist")


def test_cifar_stem_on_a_vit_is_rejected():
    with pytest.raises(ValueError, match="cifar_stem=True needs a ResNet"):
        build_backbone("vit_tiny_patch16_224", cifar_stem=True)


def test_grad_checkpointing_is_refused_with_batchnorm_or_without_support():
    with pytest.raises(ValueError, match="BatchNorm layers, whose running statistics"):
        enable_grad_checkpointing(build_backbone("resnet18", in_chans=3))
    with pytest.raises(ValueError, match="has no set_grad_checkpointing"):
        enable_grad_checkpointing(build_backbone("torchvision.resnet18", in_chans=3))
