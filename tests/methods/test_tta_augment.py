"""The test-time augmentation of CoTTA, RMT and ROID: the benchmark's get_tta_transforms in torchvision on
the same draws, one draw per batch, its own seeded generator, no host sync, pixels in and out."""

import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF

from ssl_lightning.methods.tta.augment import PixelAugment, tta_augment

from helpers.threads import one_thread  # noqa: F401 (autouse: one intra-op thread)


class GaussianNoise(torch.nn.Module):
    def __init__(self, std):
        super().__init__()
        self.std = std

    def forward(self, images):
        return images + torch.randn_like(images) * self.std


def benchmark_transform(images, padding_mode="edge", cotta_augs=True, noise_std=0.0):
    """get_tta_transforms(size, padding_mode, cotta_augs) of the benchmark (mariodoebler/test-time-adaptation,
    classification/augmentations/transforms_cotta.py) on a batch tensor: ColorJitterPro's loop, then
    torchvision's transforms, all drawing from torch's global generator."""
    adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue, TF.adjust_gamma)
    ranges = ((0.6, 1.4), (0.7, 1.3), (0.5, 1.5), (-0.06, 0.06), (0.7, 1.3))
    images = images.clamp(0, 1)
    for fn_id in torch.randperm(5):
        factor = torch.tensor(1.0).uniform_(*ranges[fn_id]).item()
        if fn_id == 4:
            images = images.clamp(1e-8, 1.0)
        images = adjust[fn_id](images, factor)
    size = images.shape[-1]
    steps = [T.Pad(padding=int(size / 2), padding_mode=padding_mode),
             T.RandomAffine(degrees=[-15, 15], translate=(1 / 16, 1 / 16), scale=(0.9, 1.1), shear=None,
                            interpolation=T.InterpolationMode.BILINEAR, fill=0)]
    if cotta_augs:
        steps += [T.GaussianBlur(kernel_size=5, sigma=[0.001, 0.5]), T.CenterCrop(size=size),
                  T.RandomHorizontalFlip(p=0.5), GaussianNoise(noise_std)]
    else:
        steps += [T.CenterCrop(size=size), T.RandomHorizontalFlip(p=0.5)]
    for step in steps:
        images = step(images)
    return images.clamp(0, 1)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("padding_mode, cotta_augs", [("edge", True), ("reflect", False)])  # CoTTA / RMT, ROID
def test_the_augmentation_is_the_benchmarks_transform_on_the_same_draws(seed, padding_mode, cotta_augs):
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(100 + seed)) * 1.2 - 0.1
    torch.manual_seed(seed)
    expected = benchmark_transform(images, padding_mode, cotta_augs)
    ours = tta_augment(images, torch.Generator().manual_seed(seed), padding_mode, cotta_augs, noise_std=0.0)
    assert torch.equal(ours, expected)


def test_one_draw_serves_the_whole_batch_and_only_the_noise_is_per_pixel():
    images = torch.rand(1, 3, 16, 16).repeat(3, 1, 1, 1)
    clean = tta_augment(images, torch.Generator().manual_seed(0), noise_std=0.0)
    assert torch.equal(clean[0], clean[1]) and torch.equal(clean[0], clean[2])
    assert clean.min() >= 0 and clean.max() <= 1 and not torch.allclose(clean, images, atol=1e-2)
    noisy = tta_augment(images, torch.Generator().manual_seed(0))
    noise = (noisy - clean)[clean.gt(0.05) & clean.lt(0.95)]
    assert not torch.equal(noisy[0], noisy[1]) and 0.002 < float(noise.std()) < 0.008
    assert tta_augment(torch.rand(2, 1, 16, 16)).shape == (2, 1, 16, 16)  # one channel: no hue or saturation


def test_the_module_draws_from_its_own_seeded_generator_whatever_the_global_one_does():
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    pixels = torch.rand(3, 3, 16, 16)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    first, second = PixelAugment(mean, std, seed=7, noise_std=0.0), PixelAugment(mean, std, seed=7, noise_std=0.0)
    torch.manual_seed(1)
    ours = first((pixels - m) / s)
    torch.manual_seed(2)  # another global state: the same augmentation
    torch.testing.assert_close(second((pixels - m) / s), ours, rtol=0, atol=0)
    expected = (tta_augment(pixels, torch.Generator().manual_seed(7), noise_std=0.0) - m) / s
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
    assert not torch.equal(first((pixels - m) / s), ours)  # the generator runs on: the next draw differs
    assert first.state_dict() == {}  # mean and std follow the device but stay out of checkpoints


def test_an_augmentation_reads_only_its_cpu_draws_never_the_images():
    from helpers.host_syncs import HostSyncCounter

    counter = HostSyncCounter()
    counter.counting = True
    with counter:
        tta_augment(torch.rand(2, 3, 16, 16), torch.Generator().manual_seed(0))
    # the draws are CPU tensors made there and then (free on any machine); the image operations read nothing
    draw_lines = {line for _, line in counter.seen if "uniform_(low, high, generator" in line or "torch.rand(1, generator" in line}
    assert draw_lines and set(line for _, line in counter.seen) == draw_lines, dict(counter.seen)


def test_bad_input_is_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"tta_augment expects images \[B, C, H, W\] with C = 1 or 3"):
        tta_augment(torch.rand(2, 4, 8, 8))
    with pytest.raises(ValueError, match=r"padding_mode must be one of edge, reflect"):
        tta_augment(torch.rand(2, 3, 8, 8), padding_mode="wrap")
    with pytest.raises(ValueError, match=r"PixelAugment needs the mean and std of 1 or 3 channels"):
        PixelAugment((0.5, 0.5), (0.2, 0.2))
