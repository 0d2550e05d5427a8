"""Batch Styles Standardization (BSS): one shared Fourier style for every image of a batch.

Scalbert, Vakalopoulou and Couzinié-Devy, "Towards domain-invariant Self-Supervised Learning with
Batch Styles Standardization", ICLR 2024 (arXiv 2303.06088). Fourier-based augmentations (FDA, Yang
& Soatto 2020; FACT, Xu et al. 2021) treat the amplitude spectrum of an image as its style and the
phase as its content. BSS transfers the low-frequency amplitude of ONE randomly chosen image of the
batch to all of them, so that every image of the batch has the same style and a method cannot
separate images by their style (domain) instead of their content. Applied to each batch of views
separately (each view index draws its own style image), the two views of an image usually get
different styles, so the positives differ in style while the negatives share it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

#: Weight of the shared style in the region: 1 replaces the amplitude there (the paper's Figure 1).
DEFAULT_MIX = 1.0


def standardize_batch_styles(
    images: torch.Tensor | Sequence[torch.Tensor],
    generator: torch.Generator | None = None,
    area_ratio: float | tuple[float, float] | None = None,
    mix: float = DEFAULT_MIX,
) -> torch.Tensor:
    """Give every image of a batch the low-frequency amplitude spectrum of one of them, chosen at random.

    With ``F(x_i) = A_i · exp(j P_i)`` the 2-D DFT of image ``i`` of a batch (per channel), ``k`` a
    uniformly random index of the batch (one draw for the whole batch) and ``M_r`` the centred
    low-frequency box covering a fraction ``r`` (``area_ratio``) of the spectrum
    (``|f_h|, |f_w| <= sqrt(r) / 2`` in cycles per pixel), BSS returns

        x̂_i = Re F⁻¹( [ M_r ⊙ ((1 - λ) A_i + λ A_k) + (1 - M_r) ⊙ A_i ] · exp(j P_i) )

    with ``λ = mix``: ``λ = 1`` (default) replaces the low-frequency amplitude of every image by the
    style image's (the paper's Figure 1: the low frequencies "are replaced"), so all images share it exactly; ``λ < 1`` interpolates.
    Phases are kept, and so are the amplitudes outside ``M_r``. ``M_r`` is symmetric under
    ``f -> -f``, so the new spectrum keeps the Hermitian symmetry of a real image's and its inverse
    is real: the transforms are ``rfft2``/``irfft2``, ``fft2``/``ifft2`` of a real signal without
    the redundant half of the spectrum (half the work, and a real result by construction).

    Meant for pixels in [0, 1] (the paper's images, before mean/std normalisation): the DC term there
    is a non-negative real, so its "amplitude" is the image mean. ``ViewDataModule`` un-normalises
    views, standardises them and normalises again.

    Args:
        images: float ``[B, C, H, W]``; a list or tuple of such tensors of one size is stacked.
        generator: for the choice of the style image; on the images' device. The choice is drawn with
            ``torch.randint`` on that device: no host synchronisation.
        area_ratio: ``r`` in (0, 1], the fraction of the spectrum's area whose amplitude is shared; a
            ``(low, high)`` pair draws ``r ~ U(low, high)`` once per call, on the device. Required:
            the paper's value could not be verified here (docs/batch_styles.md), so none is assumed.
        mix: ``λ`` in [0, 1], weight of the shared style inside the region.

    Returns:
        ``[B, C, H, W]`` tensor of the input dtype.
    """
    images = _as_batch(images)
    check_style_parameters(area_ratio, mix)
    dtype = images.dtype
    # The FFT in at least float32: half-precision FFTs only exist for power-of-two sizes on CUDA.
    height, width = images.shape[-2:]
    spectrum = torch.fft.rfft2(images.to(torch.promote_types(dtype, torch.float32)))
    amplitude, phase = spectrum.abs(), spectrum.angle()

    style_index = torch.randint(images.shape[0], (1,), device=images.device, generator=generator)
    style = amplitude.index_select(0, style_index)  # [1, C, H, W//2+1]: one style for the whole batch
    if isinstance(area_ratio, tuple | list):
        low, high = area_ratio
        area_ratio = low + (high - low) * torch.rand((), device=images.device, generator=generator, dtype=amplitude.dtype)
    region = low_frequency_region(height, width, area_ratio, images.device)[:, : width // 2 + 1]  # rfft2's half
    weight = mix * region.to(amplitude.dtype)  # λ inside the region, 0 outside
    standardized = amplitude + weight * (style - amplitude)
    return torch.fft.irfft2(torch.polar(standardized, phase), s=(height, width)).to(dtype)


def low_frequency_region(
    height: int, width: int, area_ratio: float | torch.Tensor, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Boolean ``[H, W]`` mask, in ``fft2``'s (unshifted) layout, of the centred box of frequencies
    ``|f_h|, |f_w| <= sqrt(r) / 2``: a fraction ``r`` of the spectrum's area, up to the grid. ``r``
    may be a 0-d tensor on the device (a drawn ratio): the comparison then stays on the device."""
    half_side = (area_ratio.sqrt() if isinstance(area_ratio, torch.Tensor) else math.sqrt(area_ratio)) / 2
    inside_h = torch.fft.fftfreq(height, device=device).abs() <= half_side
    inside_w = torch.fft.fftfreq(width, device=device).abs() <= half_side
    # The DC term is always shared (it is the mean colour: the coarsest part of the style).
    inside_h[0] = inside_w[0] = True
    return inside_h[:, None] & inside_w[None, :]


def check_style_parameters(area_ratio: float | tuple[float, float] | None, mix: float, prefix: str = "") -> None:
    """A clear error for a missing ratio, a ratio outside (0, 1], a range that is not (low <= high), or a
    mix outside [0, 1]."""
    if area_ratio is None:
        raise ValueError(
            f"Batch Styles Standardization needs {prefix}area_ratio, the fraction of the spectrum whose low-frequency "
            "amplitude is shared (a number in (0, 1] or a range [low, high]). The paper's value is not verified in "
            "this project yet, so there is no default: see docs/batch_styles.md."
        )
    ratios = tuple(area_ratio) if isinstance(area_ratio, tuple | list) else (area_ratio,)
    if len(ratios) not in (1, 2) or not all(0.0 < r <= 1.0 for r in ratios) or ratios[0] > ratios[-1]:
        raise ValueError(
            f"{prefix}area_ratio is the fraction of the spectrum whose amplitude is shared: a number in (0, 1] "
            f"or a range (low, high) with 0 < low <= high <= 1; got {area_ratio}"
        )
    if not 0.0 <= mix <= 1.0:
        raise ValueError(f"{prefix}mix is the weight of the shared style, in [0, 1]; got {mix}")


def _as_batch(images: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        sizes = sorted({tuple(image.shape[-2:]) for image in images})
        if len(sizes) > 1:
            raise ValueError(
                f"standardize_batch_styles: images of different sizes in one batch ({', '.join(f'{h}x{w}' for h, w in sizes)}); "
                "a shared amplitude spectrum needs one size: standardise each view size separately "
                "(ViewDataModule does so per view index)"
            )
        images = torch.stack(list(images)) if images and images[0].dim() == 3 else torch.cat(list(images))
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"standardize_batch_styles expects float images [B, C, H, W], got {images.dtype} of shape {tuple(images.shape)}")
    return images
