"""The image operations behind the corruptions, in torch, on float ``[N, C, H, W]`` batches.

Each replaces a scipy, scikit-image, OpenCV or ImageMagick call of Hendrycks & Dietterich's
``make_cifar_c.py`` (github.com/hendrycks/robustness) and says which, and with which border rule,
so that the corruptions keep the published semantics without those dependencies.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

BORDER_MODES = ("nearest", "symmetric", "reflect101")


def border_index(size: int, before: int, after: int, mode: str, device: torch.device | None = None) -> torch.Tensor:
    """Source positions of ``range(-before, size + after)`` under a border rule, for any padding,
    also wider than the image (repeated reflection):

    - ``nearest``: ``aaa|abcd|ddd`` (scipy/scikit-image "nearest", ImageMagick's edge pixels);
    - ``symmetric``: ``cba|abcd|dcb`` (scipy "reflect", the half-sample mirror);
    - ``reflect101``: ``dcb|abcd|cba`` (OpenCV's default BORDER_REFLECT_101, torch "reflect").
    """
    index = torch.arange(-before, size + after, device=device)
    if mode == "nearest":
        return index.clamp(0, size - 1)
    if mode == "symmetric":
        folded = torch.remainder(index, 2 * size)
        return torch.where(folded >= size, 2 * size - 1 - folded, folded)
    if mode == "reflect101":
        if size == 1:
            return torch.zeros_like(index)
        folded = torch.remainder(index, 2 * size - 2)
        return torch.where(folded >= size, 2 * size - 2 - folded, folded)
    raise ValueError(f"border mode must be one of {BORDER_MODES}, got {mode!r}")


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """scipy.ndimage's sampled Gaussian: radius ``int(truncate * sigma + 0.5)``, normalised."""
    radius = int(truncate * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * offsets**2 / sigma**2)
    return kernel / kernel.sum()


def _filter_axis(x: torch.Tensor, kernel: torch.Tensor, dim: int, mode: str) -> torch.Tensor:
    """Correlate the last two dims of ``x`` with a 1-D kernel along ``dim`` (-2 rows, -1 columns)."""
    radius = (len(kernel) - 1) // 2
    padded = x.index_select(dim, border_index(x.shape[dim], radius, radius, mode, x.device))
    n, c, h, w = padded.shape
    weight = kernel.to(x).view(1, 1, -1, 1) if dim == -2 else kernel.to(x).view(1, 1, 1, -1)
    return F.conv2d(padded.reshape(n * c, 1, h, w), weight).view(n, c, *x.shape[-2:])


def gaussian_filter(x: torch.Tensor, sigma: float, mode: str = "nearest", truncate: float = 4.0) -> torch.Tensor:
    """scipy.ndimage.gaussian_filter over H and W only (scikit-image's ``gaussian`` with
    ``multichannel=True``); sigma 0 returns the input, as scipy does."""
    if sigma <= 0:
        return x
    kernel = gaussian_kernel1d(sigma, truncate)
    return _filter_axis(_filter_axis(x, kernel, -2, mode), kernel, -1, mode)


def filter2d(x: torch.Tensor, kernel: torch.Tensor, mode: str = "reflect101") -> torch.Tensor:
    """cv2.filter2D (a correlation, odd kernel, OpenCV's default border) on every channel."""
    kh, kw = kernel.shape
    rows = border_index(x.shape[-2], kh // 2, kh // 2, mode, x.device)
    cols = border_index(x.shape[-1], kw // 2, kw // 2, mode, x.device)
    padded = x.index_select(-2, rows).index_select(-1, cols)
    n, c, h, w = padded.shape
    out = F.conv2d(padded.reshape(n * c, 1, h, w), kernel.to(x).view(1, 1, kh, kw))
    return out.view(n, c, *x.shape[-2:])


def disk_kernel(radius: float, alias_blur: float) -> torch.Tensor:
    """``disk()`` of make_cifar_c.py: a normalised disk on a 17x17 grid (or radius-sized above 8),
    smoothed by cv2.GaussianBlur (3x3, or 5x5 above radius 8, sigma ``alias_blur``), then cropped to
    its non-zero support: the zero rim adds nothing to a correlation, so the result is unchanged
    while the kernel fits far smaller images."""
    if radius <= 8:
        grid, ksize = np.arange(-8, 8 + 1), 3
    else:
        grid, ksize = np.arange(-radius, radius + 1), 5
    xs, ys = np.meshgrid(grid, grid)
    disk = torch.from_numpy((xs**2 + ys**2 <= radius**2).astype(np.float64))
    disk = (disk / disk.sum())[None, None]
    taps = torch.arange(ksize, dtype=torch.float64) - (ksize - 1) / 2  # cv2.getGaussianKernel
    blur = torch.exp(-(taps**2) / (2 * alias_blur**2))
    blur = blur / blur.sum()
    kernel = _filter_axis(_filter_axis(disk, blur, -2, "reflect101"), blur, -1, "reflect101")[0, 0]
    rows, cols = kernel.nonzero(as_tuple=True)
    return kernel[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].float()


def motion_blur(x: torch.Tensor, radius: float, sigma: float, angles: torch.Tensor) -> torch.Tensor:
    """ImageMagick's MotionBlurImage (what Wand's ``motion_blur`` calls), one angle per image.

    From ImageMagick's effect.c: width = 2 * ceil(radius) + 1 taps; tap i has the one-sided Gaussian
    weight exp(-i^2 / (2 sigma^2)), normalised over the taps, and reads the pixel at offset
    (ceil(i cos(angle) - 0.5), ceil(i sin(angle) - 0.5)) in (column, row), beyond the border the
    edge pixel (the default virtual pixels). Angles are in degrees.
    """
    if radius <= 0:
        raise ValueError(f"motion blur radius must be positive, got {radius}")
    n, c, h, w = x.shape
    width = 2 * math.ceil(radius) + 1
    taps = torch.arange(width, dtype=torch.float64, device=x.device)
    weights = torch.exp(-(taps**2) / (2 * sigma**2))
    weights = (weights / weights.sum()).to(x.dtype)
    theta = torch.deg2rad(angles.to(device=x.device, dtype=torch.float64))
    point_x, point_y = width * torch.sin(theta), width * torch.cos(theta)
    length = torch.hypot(point_x, point_y)[:, None]
    col_offset = torch.ceil(taps * point_y[:, None] / length - 0.5).long()  # [N, width]
    row_offset = torch.ceil(taps * point_x[:, None] / length - 0.5).long()
    rows = (torch.arange(h, device=x.device) + row_offset[..., None]).clamp(0, h - 1)  # [N, width, H]
    cols = (torch.arange(w, device=x.device) + col_offset[..., None]).clamp(0, w - 1)  # [N, width, W]
    flat = x.reshape(n, c, h * w)
    out = torch.zeros_like(flat)
    for tap in range(width):
        where = (rows[:, tap, :, None] * w + cols[:, tap, None, :]).reshape(n, 1, h * w).expand(n, c, h * w)
        out += weights[tap] * flat.gather(2, where)
    return out.view(n, c, h, w)


def clipped_zoom(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``clipped_zoom`` of make_cifar_c.py: the centre crop of side ceil(side / factor), zoomed by
    scipy.ndimage.zoom (order 1, output side round(crop * factor), i.e. bilinear with aligned
    corners), then the centre of the original size."""
    h, w = x.shape[-2:]
    crop_h, crop_w = math.ceil(h / factor), math.ceil(w / factor)
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    crop = x[..., top : top + crop_h, left : left + crop_w]
    out_h, out_w = round(crop_h * factor), round(crop_w * factor)
    zoomed = F.interpolate(crop, size=(out_h, out_w), mode="bilinear", align_corners=True)
    trim_h, trim_w = (out_h - h) // 2, (out_w - w) // 2
    return zoomed[..., trim_h : trim_h + h, trim_w : trim_w + w]


def plasma_fractal(count: int, mapsize: int, wibble_decay: float, generator: torch.Generator) -> torch.Tensor:
    """``plasma_fractal`` of make_cifar_c.py (the diamond-square height map of FLHerne/mapgen), one
    per image, batched: float64 ``[count, mapsize, mapsize]`` in [0, 1]; mapsize a power of two."""
    if mapsize & (mapsize - 1):
        raise ValueError(f"plasma_fractal needs a power-of-two mapsize, got {mapsize}")
    device = generator.device
    heights = torch.zeros(count, mapsize, mapsize, dtype=torch.float64, device=device)
    step, wibble = mapsize, 100.0

    def wibbled_mean(total: torch.Tensor) -> torch.Tensor:
        noise = torch.rand(total.shape, generator=generator, dtype=torch.float64, device=device)
        return total / 4 + wibble * (noise * 2 * wibble - wibble)

    while step >= 2:
        half = step // 2
        corners = heights[:, 0::step, 0::step]
        squares = corners + corners.roll(-1, 1)
        heights[:, half::step, half::step] = wibbled_mean(squares + squares.roll(-1, 2))
        centres, corners = heights[:, half::step, half::step], heights[:, 0::step, 0::step]
        left = centres + centres.roll(1, 1) + corners + corners.roll(-1, 2)
        heights[:, 0::step, half::step] = wibbled_mean(left)
        top = centres + centres.roll(1, 2) + corners + corners.roll(-1, 1)
        heights[:, half::step, 0::step] = wibbled_mean(top)
        step, wibble = half, wibble / wibble_decay
    heights -= heights.amin((1, 2), keepdim=True)
    return heights / heights.amax((1, 2), keepdim=True)


def swap_nearby_pixels(x: torch.Tensor, max_delta: int, generator: torch.Generator) -> torch.Tensor:
    """One pass of glass blur's local pixel shuffle, vectorised.

    make_cifar_c.py visits every pixel (h, w) with max_delta < h, w <= side - max_delta (bottom-right
    first) and swaps it with the pixel at (h + dy, w + dx), dy and dx uniform in [-max_delta, max_delta).
    Here the same swaps (every such pixel starts one, offsets drawn alike) run in 4 max_delta^2
    groups: the pixels of a group lie 2 max_delta apart in both directions, so their swaps touch
    disjoint pixels and run at once. Only the order of overlapping swaps differs from the
    sequential loop, which changes how far a pixel that is swapped twice can travel.
    """
    n, c, h, w = x.shape
    stride, device = 2 * max_delta, x.device
    rows_all = torch.arange(max_delta + 1, h - max_delta + 1, device=device)
    cols_all = torch.arange(max_delta + 1, w - max_delta + 1, device=device)
    flat = x.reshape(n, c, h * w).clone()
    for row_phase in reversed(range(stride)):
        for col_phase in reversed(range(stride)):
            rows, cols = rows_all[rows_all % stride == row_phase], cols_all[cols_all % stride == col_phase]
            if len(rows) == 0 or len(cols) == 0:
                continue
            shape = (n, len(rows), len(cols))
            dy = torch.randint(-max_delta, max_delta, shape, generator=generator, device=device)
            dx = torch.randint(-max_delta, max_delta, shape, generator=generator, device=device)
            source = (rows[:, None] * w + cols[None, :]).expand(shape)
            target = (rows[:, None] + dy) * w + cols[None, :] + dx
            source = source.reshape(n, 1, -1).expand(n, c, -1)
            target = target.reshape(n, 1, -1).expand(n, c, -1)
            source_values, target_values = flat.gather(2, source), flat.gather(2, target)
            flat.scatter_(2, source, target_values)
            flat.scatter_(2, target, source_values)
    return flat.view(n, c, h, w)


def _pixel_grid(h: int, w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    return rows.double(), cols.double()


def affine_warp(x: torch.Tensor, forward: torch.Tensor) -> torch.Tensor:
    """cv2.warpAffine(image, M, (W, H), borderMode=BORDER_REFLECT_101) per image, bilinear: output
    pixel p (x = column, y = row) reads the input at M^-1 p. ``forward``: [N, 2, 3] float64 matrices M."""
    n, _, h, w = x.shape
    rows, cols = _pixel_grid(h, w, x.device)
    linear_inverse = torch.linalg.inv(forward[:, :, :2])
    output_points = torch.stack([cols, rows], -1).view(1, h * w, 2) - forward[:, None, :, 2]
    source_points = (output_points @ linear_inverse.transpose(1, 2)).view(n, h, w, 2)
    scale = torch.tensor([max(w - 1, 1), max(h - 1, 1)], dtype=torch.float64, device=x.device)
    grid = (2 * source_points / scale - 1).to(x.dtype)
    # align_corners=True reflects about the outer pixel centres: OpenCV's BORDER_REFLECT_101
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=True)


def displace(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """scipy.ndimage.map_coordinates(order=1, mode="reflect") at (row + shift[:, 1], column + shift[:, 0]),
    every channel alike. ``shift``: [N, 2, H, W] in pixels (column shift first)."""
    _, _, h, w = x.shape
    rows, cols = _pixel_grid(h, w, x.device)
    points = torch.stack([cols + shift[:, 0], rows + shift[:, 1]], -1)
    size = torch.tensor([w, h], dtype=torch.float64, device=x.device)
    # align_corners=False reflects about the outer pixel edges: scipy's "reflect" (half-sample mirror)
    grid = ((2 * points + 1) / size - 1).to(x.dtype)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def elastic_warp(
    x: torch.Tensor, alpha: float, sigma: float, affine_jitter: float, generator: torch.Generator
) -> torch.Tensor:
    """``elastic_transform`` of make_cifar_c.py (after Simard et al. 2003, erniejunior's gist).

    1. A random affine map: three points around the centre (at +-min(H, W) // 3) moved by uniform
       [-affine_jitter, affine_jitter] px, applied as cv2.warpAffine (``affine_warp``);
    2. a displacement field: uniform [-1, 1] noise per pixel and axis, Gaussian-smoothed (sigma,
       scipy "reflect" border, truncate 3) and scaled by alpha, sampled as
       scipy.ndimage.map_coordinates (``displace``).
    """
    n, _, h, w = x.shape
    device = x.device
    centre = torch.tensor([w // 2, h // 2], dtype=torch.float64, device=device)  # (x, y), as cv2 takes points
    side = min(h, w) // 3
    source = torch.stack([centre + side, centre + torch.tensor([side, -side], device=device), centre - side])
    jitter = torch.rand(n, 3, 2, generator=generator, dtype=torch.float64, device=device) * 2 - 1
    target = source + affine_jitter * jitter
    # cv2.getAffineTransform: the M with target = M [x, y, 1] for the three points
    homogeneous = torch.cat([source, torch.ones(3, 1, dtype=torch.float64, device=device)], 1)
    forward = torch.linalg.solve(homogeneous, target).transpose(1, 2)
    noise = torch.rand(n, 2, h, w, generator=generator, dtype=torch.float64, device=device) * 2 - 1
    shift = gaussian_filter(noise, sigma, mode="symmetric", truncate=3.0) * alpha
    return displace(affine_warp(x, forward), shift)
