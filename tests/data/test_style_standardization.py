"""Batch Styles Standardization (Scalbert et al., ICLR 2024): the shared low-frequency amplitude, the
kept phases and high frequencies, a plain numpy reference, and the DataModule option on both view paths."""

import numpy as np
import pytest
import torch

from ssl_lightning.datamodules import Digits
from ssl_lightning.datamodules.style_standardization import low_frequency_region, standardize_batch_styles

from helpers.host_syncs import HostSyncCounter

RATIO = 0.1  # a test value: the option has no default (the paper's is not verified here)


def images(batch=6, channels=3, height=16, width=12, seed=0) -> torch.Tensor:
    return torch.rand(batch, channels, height, width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def style_index(batch: int, seed: int) -> int:
    """The function's draw for a generator seeded with `seed`."""
    return int(torch.randint(batch, (1,), generator=torch.Generator().manual_seed(seed)))


def reference(batch: np.ndarray, style: int, area_ratio: float, mix: float) -> np.ndarray:
    """Per image and channel: amplitude and phase of numpy's DFT, the box of frequencies
    |f_h|, |f_w| <= sqrt(r)/2 (and DC) takes (1 - mix) A_i + mix A_style, back to pixels."""
    b, c, h, w = batch.shape
    half_side = np.sqrt(area_ratio) / 2

    def frequency(u: int, n: int) -> float:  # cycles per pixel of DFT index u
        return u / n if u < (n + 1) // 2 else (u - n) / n

    out = np.empty_like(batch)
    for i in range(b):
        for ch in range(c):
            spectrum = np.fft.fft2(batch[i, ch])
            style_amplitude = np.abs(np.fft.fft2(batch[style, ch]))
            amplitude, phase = np.abs(spectrum), np.angle(spectrum)
            for u in range(h):
                for v in range(w):
                    low_h = u == 0 or abs(frequency(u, h)) <= half_side
                    low_w = v == 0 or abs(frequency(v, w)) <= half_side
                    if low_h and low_w:
                        amplitude[u, v] = (1 - mix) * amplitude[u, v] + mix * style_amplitude[u, v]
            out[i, ch] = np.fft.ifft2(amplitude * np.exp(1j * phase)).real
    return out


@pytest.mark.parametrize("height,width", [(16, 12), (15, 9)])
@pytest.mark.parametrize("area_ratio,mix", [(0.1, 1.0), (0.3, 0.5), (1.0, 1.0)])
def test_matches_a_plain_numpy_reference(height, width, area_ratio, mix):
    batch = images(height=height, width=width)
    out = standardize_batch_styles(batch, torch.Generator().manual_seed(7), area_ratio=area_ratio, mix=mix)
    expected = reference(batch.numpy(), style_index(len(batch), 7), area_ratio, mix)
    assert out.dtype == batch.dtype and out.shape == batch.shape
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-10)


def test_every_image_gets_one_low_frequency_amplitude_and_keeps_its_phase_and_high_frequencies():
    batch = images(batch=8, height=32, width=32)
    out = standardize_batch_styles(batch, torch.Generator().manual_seed(1), area_ratio=RATIO)
    before, after = torch.fft.fft2(batch), torch.fft.fft2(out)
    region = low_frequency_region(32, 32, 0.1)
    assert 0.05 < region.float().mean() < 0.15  # about a tenth of the spectrum
    # One shared amplitude in the region: the style image's own.
    shared = after.abs()[..., region]
    torch.testing.assert_close(shared, shared[:1].expand_as(shared), rtol=1e-9, atol=1e-9)
    style = style_index(8, 1)
    torch.testing.assert_close(shared[0], before.abs()[style][..., region], rtol=1e-9, atol=1e-9)
    # Phases kept wherever both amplitudes are not negligible.
    visible = (before.abs() > 1e-6) & (after.abs() > 1e-6)
    turn = (after.angle() - before.angle() + torch.pi) % (2 * torch.pi) - torch.pi
    assert turn[visible].abs().max() < 1e-8
    # Outside the region, the spectrum is untouched.
    torch.testing.assert_close(after[..., ~region], before[..., ~region], rtol=1e-9, atol=1e-9)
    # Styles did differ before: the test would otherwise prove nothing.
    assert (before.abs()[..., region] - before.abs()[:1][..., region]).abs().max() > 0.1


def test_half_precision_in_half_precision_out_and_a_list_of_one_size_is_stacked():
    batch = images(batch=4, height=8, width=8).float()
    out = standardize_batch_styles(list(batch.bfloat16()), torch.Generator().manual_seed(0), area_ratio=RATIO)
    assert out.dtype == torch.bfloat16 and out.shape == batch.shape


def test_images_of_different_sizes_in_one_batch_are_a_clear_error():
    with pytest.raises(ValueError, match=r"different sizes in one batch \(8x8, 16x16\).*per view index"):
        standardize_batch_styles([torch.rand(3, 16, 16), torch.rand(3, 8, 8)], area_ratio=RATIO)
    with pytest.raises(ValueError, match="area_ratio"):
        standardize_batch_styles(images(), area_ratio=0.0)
    with pytest.raises(ValueError, match="mix"):
        standardize_batch_styles(images(), area_ratio=RATIO, mix=1.5)
    with pytest.raises(ValueError, match=r"float images \[B, C, H, W\]"):
        standardize_batch_styles(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), area_ratio=RATIO)


def test_a_ratio_range_draws_the_ratio_on_the_device():
    batch = images(batch=4, height=32, width=32)
    fixed = standardize_batch_styles(batch, torch.Generator().manual_seed(2), area_ratio=0.2)
    degenerate = standardize_batch_styles(batch, torch.Generator().manual_seed(2), area_ratio=(0.2, 0.2))
    torch.testing.assert_close(degenerate, fixed)
    with pytest.raises(ValueError, match=r"range \(low, high\)"):
        standardize_batch_styles(batch, area_ratio=(0.3, 0.1))


@pytest.mark.parametrize("area_ratio", [0.1, (0.05, 0.3)])
def test_no_host_sync(area_ratio):
    batch, generator = images().float(), torch.Generator().manual_seed(0)
    counter = HostSyncCounter()
    counter.counting = True
    with counter:
        standardize_batch_styles(batch, generator, area_ratio=area_ratio)
    assert counter.total() == 0, dict(counter.seen)


class Stage:
    """Stands in for the Trainer in on_after_batch_transfer, which only touches training batches."""

    def __init__(self, training: bool) -> None:
        self.training = training


def first_batch(view_device: str, batch_styles: bool, views: str = "simclr") -> tuple[Digits, dict]:
    datamodule = Digits(batch_size=8, num_workers=0, seed=3, view_device=view_device, batch_styles=batch_styles,
                        batch_styles_area_ratio=RATIO, views=views)
    datamodule.setup("fit")
    batch = datamodule.on_before_batch_transfer(next(iter(datamodule.train_dataloader())), 0)
    datamodule.trainer = Stage(training=True)
    return datamodule, datamodule.on_after_batch_transfer(batch, 0)


@pytest.mark.parametrize("view_device", ["cpu", "device"])
def test_datamodule_standardises_every_training_view_index_on_both_view_paths(view_device):
    datamodule, plain = first_batch(view_device, batch_styles=False)
    _, styled = first_batch(view_device, batch_styles=True)
    mean, std = (torch.tensor(stats).view(1, -1, 1, 1) for stats in (datamodule.mean, datamodule.std))
    size = datamodule.image_size
    region = low_frequency_region(size, size, 0.1)
    assert len(styled["views"]) == len(plain["views"]) == 2
    for before, after in zip(plain["views"], styled["views"]):
        before, after = torch.fft.fft2(before * std + mean), torch.fft.fft2(after * std + mean)  # pixels in [0, 1]
        shared = after.abs()[..., region]
        torch.testing.assert_close(shared, shared[:1].expand_as(shared), rtol=1e-4, atol=1e-4)
        visible = (before.abs() > 0.05) & (after.abs() > 0.05)  # float32: phases of tiny amplitudes are rounding
        turn = (after.angle() - before.angle() + torch.pi) % (2 * torch.pi) - torch.pi
        assert turn[visible].abs().max() < 1e-3  # the same views, restyled
        torch.testing.assert_close(after[..., ~region], before[..., ~region], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("view_device", ["cpu", "device"])
def test_multi_crop_views_of_two_sizes_are_standardised_per_view_index(view_device):
    datamodule, plain = first_batch(view_device, batch_styles=False, views="dino")
    _, styled = first_batch(view_device, batch_styles=True, views="dino")
    mean, std = (torch.tensor(stats).view(1, -1, 1, 1) for stats in (datamodule.mean, datamodule.std))
    assert len({view.shape[-1] for view in styled["views"]}) == 2  # global and local crops
    for before, after in zip(plain["views"], styled["views"]):
        assert after.shape == before.shape
        amplitude = torch.fft.fft2(after * std + mean).abs()[..., 0, 0]  # DC: always in the shared region
        torch.testing.assert_close(amplitude, amplitude[:1].expand_as(amplitude), rtol=1e-4, atol=1e-4)


def test_datamodule_leaves_validation_batches_untouched():
    datamodule = Digits(batch_size=8, num_workers=0, batch_styles=True, batch_styles_area_ratio=RATIO)
    datamodule.setup("fit")
    batch = next(iter(datamodule.val_dataloader()))
    datamodule.trainer = Stage(training=False)
    out = datamodule.on_after_batch_transfer(batch, 0)
    assert out is batch


def test_datamodule_checks_the_style_parameters_before_training():
    with pytest.raises(ValueError, match="needs batch_styles_area_ratio.*no default"):
        Digits(batch_styles=True)
    with pytest.raises(ValueError, match="batch_styles_area_ratio"):
        Digits(batch_styles=True, batch_styles_area_ratio=2.0)
    with pytest.raises(ValueError, match="batch_styles_mix"):
        Digits(batch_styles=True, batch_styles_area_ratio=RATIO, batch_styles_mix=-0.1)
