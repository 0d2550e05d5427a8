"""MSBReg's three losses against plain float64 references (value and gradient), their edge cases, and
two ranks against one process."""

import math

import pytest
import torch
import torch.distributed as dist

from ssl_lightning.losses import (
    brownian_diffusive_loss,
    multiview_centroid_loss,
    normalized_regression,
    singular_value_loss,
)

from helpers.gloo import WORLD_SIZE, run_on_two_ranks


def unit(v):
    return v / torch.sqrt((v * v).sum())


def reference_centroid_loss(online, target):
    """Row by row: each online view's distance to the unit centroid of the image's target views."""
    views, images, _ = online.shape
    total = 0.0
    for n in range(images):
        centroid = sum(unit(target[v, n]) for v in range(views)) / views
        centroid = unit(centroid)
        for v in range(views):
            difference = unit(online[v, n]) - centroid
            total = total + (difference * difference).sum()
    return total / (views * images)


def reference_singular_value_loss(z):
    """-(sum of the exact singular values of the unit rows) / sqrt(N min(N, D))."""
    rows = torch.stack([unit(row) for row in z])
    n, d = rows.shape
    return -torch.linalg.svdvals(rows).sum() / math.sqrt(n * min(n, d))


def reference_brownian_loss(z, directions):
    return sum((unit(z_i) * unit(r_i)).sum() for z_i, r_i in zip(z, directions)) / len(z)


def value_and_grads(loss_fn, *inputs):
    inputs = [x.clone().requires_grad_(True) for x in inputs]
    loss = loss_fn(*inputs)
    return (loss, *torch.autograd.grad(loss, inputs))


def assert_matches(actual, expected, rtol=1e-10, atol=1e-12):
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ----------------------------------------------------------------- multiview centroid loss
@pytest.mark.parametrize("views, images, dim", [(1, 1, 3), (2, 1, 4), (2, 5, 4), (4, 3, 8), (3, 6, 2)])
def test_centroid_value_and_gradients_match_reference(views, images, dim):
    online, target = randn(views, images, dim, seed=images), randn(views, images, dim, seed=100 + dim)
    assert_matches(value_and_grads(multiview_centroid_loss, online, target),
                   value_and_grads(reference_centroid_loss, online, target))


def test_centroid_of_identical_views_is_zero_with_zero_gradient():
    image = randn(1, 5, 6)
    online, target = image.expand(4, 5, 6) * 3.0, image.expand(4, 5, 6) * 0.5  # scale is ignored
    loss, grad_online, grad_target = value_and_grads(multiview_centroid_loss, online, target)
    torch.testing.assert_close(loss.item(), 0.0, rtol=0, atol=1e-14)
    assert grad_online.abs().max() < 1e-14 and grad_target.abs().max() < 1e-14


def test_centroid_of_a_collapsed_batch_is_zero():
    direction = randn(6)
    loss = multiview_centroid_loss(direction.expand(3, 8, 6), direction.expand(3, 8, 6))
    assert loss.item() == pytest.approx(0, abs=1e-14)


def test_one_view_is_byols_normalised_regression():
    online, target = randn(1, 7, 5, seed=1), randn(1, 7, 5, seed=2)
    torch.testing.assert_close(multiview_centroid_loss(online, target), normalized_regression(online[0], target[0]))


def test_views_are_pulled_to_the_target_centroid_not_to_their_own_target():
    # Two target views on opposite sides of the centroid: an online view equal to its own target
    # still pays for the spread, so the loss asks for invariance, not for copying the target.
    target = torch.tensor([[[1.0, 1.0]], [[1.0, -1.0]]], dtype=torch.float64)
    loss = multiview_centroid_loss(target.clone(), target)
    torch.testing.assert_close(loss.item(), 2 - 2 * math.cos(math.pi / 4), rtol=1e-12, atol=0)


def test_centroid_loss_is_float32_for_half_inputs():
    online, target = randn(2, 4, 8, seed=3), randn(2, 4, 8, seed=4)
    low = multiview_centroid_loss(online.half(), target.half())
    assert low.dtype == torch.float32
    torch.testing.assert_close(low.double(), multiview_centroid_loss(online.half().double(), target.half().double()),
                               rtol=1e-6, atol=0)


@pytest.mark.parametrize("online, target", [((2, 4, 3), (2, 4, 5)), ((4, 3), (4, 3)), ((0, 4, 3), (0, 4, 3))])
def test_centroid_loss_rejects_bad_shapes(online, target):
    with pytest.raises(ValueError, match=r"same shape \[V, N, D\]"):
        multiview_centroid_loss(torch.randn(online), torch.randn(target))


# ----------------------------------------------------------------- singular value loss
@pytest.mark.parametrize("images, dim", [(2, 5), (7, 4), (16, 32), (40, 6), (64, 16)])
def test_singular_value_value_and_gradient_match_exact_singular_values(images, dim):
    z = randn(images, dim, seed=images * dim)
    assert_matches(value_and_grads(singular_value_loss, z), value_and_grads(reference_singular_value_loss, z),
                   rtol=1e-9, atol=1e-12)


def test_singular_value_loss_holds_for_an_ill_conditioned_spectrum():
    # Singular values falling as k^-2 over 64 dimensions: eigenvalues of the Gram matrix over 7 decades.
    z = randn(256, 64, seed=5) * torch.arange(1, 65, dtype=torch.float64) ** -2.0
    torch.testing.assert_close(singular_value_loss(z), reference_singular_value_loss(z), rtol=1e-9, atol=0)


def test_a_batch_of_one_gives_minus_one_and_no_gradient():
    loss, grad = value_and_grads(singular_value_loss, randn(1, 5))
    assert loss.item() == pytest.approx(-1.0, abs=1e-14) and grad.abs().max() < 1e-14


def test_an_isotropic_batch_is_the_minimum_with_no_gradient():
    z = torch.cat([torch.eye(4, dtype=torch.float64), -torch.eye(4, dtype=torch.float64)]) * 2.5
    loss, grad = value_and_grads(singular_value_loss, z)
    assert loss.item() == pytest.approx(-1.0, abs=1e-14) and grad.abs().max() < 1e-12
    for seed in range(5):  # and any other batch of that shape pays more
        assert singular_value_loss(randn(8, 4, seed=seed)).item() > -1.0 + 1e-6


@pytest.mark.parametrize("images, dim", [(8, 16), (32, 4)])
def test_a_collapsed_batch_gives_its_maximum_and_a_finite_gradient(images, dim):
    z = randn(1, dim).expand(images, dim) * torch.linspace(0.5, 2.0, images, dtype=torch.float64)[:, None]
    loss, grad = value_and_grads(singular_value_loss, z)
    assert loss.item() == pytest.approx(-1 / math.sqrt(min(images, dim)), abs=1e-9)  # rounding: tiny sigma_k
    assert torch.isfinite(grad).all()


def test_singular_value_loss_ignores_row_norms():
    z = randn(12, 5, seed=6)
    scaled = z * torch.linspace(0.1, 10.0, 12, dtype=torch.float64)[:, None]
    torch.testing.assert_close(singular_value_loss(scaled), singular_value_loss(z), rtol=1e-12, atol=0)


def test_singular_value_loss_is_float32_for_half_inputs():
    z = randn(32, 8, seed=7)
    low = singular_value_loss(z.half())
    assert low.dtype == torch.float32
    torch.testing.assert_close(low.double(), reference_singular_value_loss(z.half().double()), rtol=1e-5, atol=0)


def test_singular_value_loss_rejects_bad_input():
    with pytest.raises(ValueError, match=r"shape \[N, D\].*\(2, 3, 4\)"):
        singular_value_loss(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="iterations >= 1"):
        singular_value_loss(torch.randn(4, 3), iterations=0)


# ----------------------------------------------------------------- Brownian diffusive loss
@pytest.mark.parametrize("images, dim", [(1, 3), (2, 5), (9, 4), (16, 32)])
def test_brownian_value_and_gradients_match_reference(images, dim):
    z, directions = randn(images, dim, seed=images), randn(images, dim, seed=50 + dim)
    assert_matches(value_and_grads(brownian_diffusive_loss, z, directions),
                   value_and_grads(reference_brownian_loss, z, directions))


def test_brownian_gradient_kicks_each_embedding_along_the_sphere_against_its_own_direction():
    z, directions = randn(6, 5, seed=8), randn(6, 5, seed=9)
    _, grad, _ = value_and_grads(brownian_diffusive_loss, z, directions)
    torch.testing.assert_close((grad * z).sum(dim=1), torch.zeros(6, dtype=torch.float64), rtol=0, atol=1e-15)
    for i in range(6):  # only row i's direction moves row i: the tangent part of r_i, scaled by 1 / (N ||z_i||)
        u, r = unit(z[i]), unit(directions[i])
        torch.testing.assert_close(grad[i], (r - (r @ u) * u) / (6 * z[i].norm()), rtol=1e-12, atol=1e-15)


def test_brownian_loss_of_aligned_and_opposite_directions():
    z = randn(4, 3, seed=10)
    assert brownian_diffusive_loss(z, 2 * z).item() == pytest.approx(1.0, abs=1e-14)
    assert brownian_diffusive_loss(z, -z).item() == pytest.approx(-1.0, abs=1e-14)


def test_brownian_loss_of_a_collapsed_batch_still_moves_every_particle_its_own_way():
    z = randn(1, 4, seed=11).expand(5, 4)
    _, grad, _ = value_and_grads(brownian_diffusive_loss, z, randn(5, 4, seed=12))
    assert torch.linalg.matrix_rank(grad).item() > 1  # the particles are pushed apart


def test_brownian_loss_rejects_mismatched_directions():
    with pytest.raises(ValueError, match=r"z and directions of the same 2-D shape.*\(4, 3\) and \(4, 2\)"):
        brownian_diffusive_loss(torch.randn(4, 3), torch.randn(4, 2))


# ----------------------------------------------------------------- two ranks = one process
SHARDS = {"equal": [4, 4], "uneven": [3, 5]}


def losses_on_this_rank(inputs: dict) -> dict:
    """Every loss on this rank's shard of each case; the loss and the gradients of its inputs."""
    results = {}

    def detached(*args):
        return [t.detach() for t in value_and_grads(*args)]

    for case, sizes in SHARDS.items():
        start, stop = sum(sizes[: dist.get_rank()]), sum(sizes[: dist.get_rank() + 1])
        online, target = (x[:, start:stop] for x in inputs["centroid"])
        results[f"centroid/{case}"] = detached(multiview_centroid_loss, online, target)
        results[f"singular_value/{case}"] = detached(singular_value_loss, inputs["singular_value"][start:stop])
        z, directions = (x[start:stop] for x in inputs["brownian"])
        results[f"brownian/{case}"] = detached(brownian_diffusive_loss, z, directions)
    return results


@pytest.mark.ddp
@pytest.mark.timeout(120)
def test_two_ranks_give_the_global_batch_loss_and_world_size_times_its_gradients(tmp_path):
    inputs = {"centroid": (randn(3, 8, 5, seed=20), randn(3, 8, 5, seed=21)),
              "singular_value": randn(8, 6, seed=22),
              "brownian": (randn(8, 5, seed=23), randn(8, 5, seed=24))}
    ranks = run_on_two_ranks(losses_on_this_rank, tmp_path, inputs)
    whole = {"centroid": value_and_grads(multiview_centroid_loss, *inputs["centroid"]),
             "singular_value": value_and_grads(singular_value_loss, inputs["singular_value"]),
             "brownian": value_and_grads(brownian_diffusive_loss, *inputs["brownian"])}
    for case, sizes in SHARDS.items():
        for loss_name, (loss, *grads) in whole.items():
            for rank, result in enumerate(ranks):
                start, stop = sum(sizes[:rank]), sum(sizes[: rank + 1])
                got_loss, *got_grads = result[f"{loss_name}/{case}"]
                torch.testing.assert_close(got_loss, loss, rtol=1e-10, atol=1e-12)
                for got, grad in zip(got_grads, grads, strict=True):
                    rows = grad[:, start:stop] if loss_name == "centroid" else grad[start:stop]
                    torch.testing.assert_close(got, WORLD_SIZE * rows, rtol=1e-9, atol=1e-12)
