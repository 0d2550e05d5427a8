"""MAE's loss against a plain float64 reference (value and gradient), its indifference to visible
patches, the normalised-pixel target against its formula, the patch reshapes, the edge cases, and the
two-rank global mean."""

import math

import pytest
import torch

from ssl_lightning.losses.mae import mae_loss, normalised_pixel_target, patchify, unpatchify

from helpers.gloo import assert_global_batch_value_and_gradients, loss_on_one_rank, run_on_two_ranks


def reference_patch(image, row, column, p):
    """Patch (row, column) of a [C, H, W] image, flattened as (row in patch, column in patch, channel)."""
    return [float(image[c, row * p + i, column * p + j]) for i in range(p) for j in range(p)
            for c in range(image.shape[0])]


def reference_normalised(values):
    """(x - mean) / sqrt(unbiased variance + 1e-6), one patch's values at a time."""
    n = len(values)
    mean = sum(values) / n
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return [(v - mean) / math.sqrt(variance + 1e-6) for v in values]


def reference_mae_loss(pred, target, mask, norm_pix):
    """Patch by patch: the mean squared error over the patch's values, summed over masked patches,
    divided by their number (0 when none is masked)."""
    total, count = 0.0, 0.0
    for n in range(pred.shape[0]):
        for patch in range(pred.shape[1]):
            t = target[n, patch]
            if norm_pix:
                values = t.tolist()
                mean = sum(values) / len(values)
                variance = ((t - mean) ** 2).sum() / (len(values) - 1)
                t = (t - mean) / torch.sqrt(variance + 1e-6)
            error = ((pred[n, patch] - t) ** 2).sum() / pred.shape[2]
            total = total + mask[n, patch] * error
            count += float(mask[n, patch])
    return total / count if count else (pred * 0).sum()


def random_inputs(n=3, num_patches=6, patch_dim=12, seed=0, masked=None):
    generator = torch.Generator().manual_seed(seed)
    pred = torch.randn(n, num_patches, patch_dim, generator=generator, dtype=torch.float64)
    target = 3 * torch.rand(n, num_patches, patch_dim, generator=generator, dtype=torch.float64) + 1
    mask = (torch.rand(n, num_patches, generator=generator) < 0.75).double() if masked is None else masked
    return pred, target, mask


def value_and_grad(loss_fn, pred, target, mask, norm_pix):
    pred = pred.clone().requires_grad_(True)
    loss = loss_fn(pred, target, mask, norm_pix)
    return loss, torch.autograd.grad(loss, pred)[0]


@pytest.mark.parametrize("norm_pix", [True, False])
@pytest.mark.parametrize("shape", [(3, 6, 12), (1, 4, 2), (2, 16, 48)])  # a batch of one; the smallest patch
def test_value_and_gradient_match_the_reference(norm_pix, shape):
    pred, target, mask = random_inputs(*shape, seed=sum(shape))
    mask[0, 0] = 1.0  # at least one masked patch
    actual = value_and_grad(mae_loss, pred, target, mask, norm_pix)
    expected = value_and_grad(reference_mae_loss, pred, target, mask, norm_pix)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_the_loss_is_unchanged_when_visible_patches_change(norm_pix):
    pred, target, mask = random_inputs(n=4, num_patches=8, patch_dim=12, seed=3)
    visible = (mask == 0).unsqueeze(-1)
    assert visible.any() and (~visible).any()
    other_target = torch.where(visible, 100 * torch.randn_like(target), target)  # new pixels where visible
    other_pred = torch.where(visible, -50 * torch.randn_like(pred), pred)  # and new predictions there
    loss, grad = value_and_grad(mae_loss, pred, target, mask, norm_pix)
    other_loss, other_grad = value_and_grad(mae_loss, other_pred, other_target, mask, norm_pix)
    torch.testing.assert_close(other_loss, loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(other_grad, grad, rtol=1e-12, atol=1e-12)
    assert torch.count_nonzero(grad * visible) == 0  # the visible predictions get no gradient
    changed = torch.where(~visible, target + torch.rand_like(target), target)  # while the masked patches' targets count
    assert not torch.isclose(mae_loss(pred, changed, mask, norm_pix), loss)


def test_the_normalised_pixel_target_matches_the_formula():
    images = torch.rand(2, 3, 8, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 255
    patches = patchify(images, 4)
    actual = normalised_pixel_target(patches)
    for n in range(2):
        for patch in range(patches.shape[1]):
            expected = reference_normalised(patches[n, patch].tolist())
            torch.testing.assert_close(actual[n, patch], torch.tensor(expected, dtype=torch.float64))
    # the loss with norm_pix is the plain loss against that target
    pred, _, mask = random_inputs(2, patches.shape[1], patches.shape[2], seed=4)
    torch.testing.assert_close(mae_loss(pred, patches, mask, True), mae_loss(pred, actual, mask, False))


def test_a_constant_patch_normalises_to_zero_with_the_eps():
    patches = torch.full((1, 2, 4), 7.0, dtype=torch.float64)
    assert torch.equal(normalised_pixel_target(patches), torch.zeros_like(patches))


@pytest.mark.parametrize(("channels", "height", "width", "p"), [(3, 8, 8, 4), (1, 12, 8, 4), (2, 6, 9, 3), (3, 5, 5, 1)])
def test_patchify_lays_out_patches_row_major_and_unpatchify_inverts_it(channels, height, width, p):
    images = torch.randn(2, channels, height, width, generator=torch.Generator().manual_seed(channels))
    patches = patchify(images, p)
    rows, columns = height // p, width // p
    assert patches.shape == (2, rows * columns, p * p * channels)
    for n in range(2):
        for row in range(rows):
            for column in range(columns):
                expected = torch.tensor(reference_patch(images[n], row, column, p))
                torch.testing.assert_close(patches[n, row * columns + column], expected, rtol=0, atol=0)
    assert torch.equal(unpatchify(patches, p, (rows, columns)), images)
    if rows == columns:  # the official square default
        assert torch.equal(unpatchify(patches, p), images)


def test_no_masked_patch_gives_zero_with_zero_gradient_and_all_masked_is_the_plain_mean():
    pred, target, _ = random_inputs(2, 4, 6, seed=5)
    loss, grad = value_and_grad(mae_loss, pred, target, torch.zeros(2, 4, dtype=torch.float64), True)
    assert loss.item() == 0.0 and torch.count_nonzero(grad) == 0
    every = mae_loss(pred, target, torch.ones(2, 4), False)
    torch.testing.assert_close(every, ((pred - target) ** 2).mean())


def test_a_boolean_mask_and_low_precision_inputs_give_a_float32_loss():
    pred, target, mask = random_inputs(2, 4, 6, seed=6)
    expected = mae_loss(pred, target, mask, True)
    loss = mae_loss(pred.bfloat16(), target.bfloat16(), mask.bool(), True)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), expected, rtol=2e-2, atol=2e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert mae_loss(pred.float(), target.float(), mask, True).dtype == torch.float32


def test_bad_inputs_are_named():
    pred, target, mask = random_inputs(2, 4, 6)
    with pytest.raises(ValueError, match=r"same shape \[N, L, p\*p\*C\]"):
        mae_loss(pred, target[:, :3], mask)
    with pytest.raises(ValueError, match=r"mask \[N, L\] = \(2, 4\)"):
        mae_loss(pred, target, mask[:, :3])
    with pytest.raises(ValueError, match="at least 2 values"):
        mae_loss(pred[..., :1], target[..., :1], mask, norm_pix=True)
    with pytest.raises(ValueError, match="multiple of the patch size 4"):
        patchify(torch.zeros(1, 3, 10, 8), 4)
    with pytest.raises(ValueError, match="grid_size"):
        unpatchify(torch.zeros(1, 6, 48), 4)  # 6 patches make no square


@pytest.mark.ddp
@pytest.mark.timeout(120)
@pytest.mark.parametrize("norm_pix", [True, False])
def test_two_ranks_give_the_global_batch_value_and_gradients(tmp_path, norm_pix):
    # Uneven shards with different numbers of masked patches: a per-rank mean would be wrong here.
    shards = [random_inputs(2, 5, 8, seed=7), random_inputs(3, 5, 8, seed=8)]
    shards[1][2][0] = 0.0  # an image with every patch visible
    results = run_on_two_ranks(loss_on_one_rank, tmp_path, mae_loss, shards, norm_pix)
    pred, target, mask = (torch.cat(parts) for parts in zip(*shards))
    loss, grad = value_and_grad(reference_mae_loss, pred, target, mask, norm_pix)
    assert_global_batch_value_and_gradients(results, loss, grad, [2, 3])
