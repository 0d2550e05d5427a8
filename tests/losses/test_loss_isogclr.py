"""iSogCLR's loss (losses/isogclr.py): the gradient surrogate, the new partition estimates u and the
temperature gradients against a plain float64 reference, the temperature step, edge cases, and the
global batch on two gloo ranks."""

import math

import pytest
import torch
import torch.distributed as dist

from ssl_lightning.losses.isogclr import isogclr, isogclr_temperature_step

from helpers.gloo import WORLD_SIZE, assert_global_batch_value_and_gradients, run_on_two_ranks


def reference_isogclr(z1, z2, tau, partition, gamma, rho, clip):
    """Algorithm 1 of the paper written anchor by anchor: returns (loss, new u per image, tau gradient per image)."""
    n = len(z1)
    views = [[v / torch.sqrt((v * v).sum()) for v in z1], [v / torch.sqrt((v * v).sum()) for v in z2]]
    total = 0.0
    new_u, tau_grads = [], []
    for i in range(n):
        u_of_anchor, grad_of_anchor = [], []
        for view in (0, 1):
            anchor, positive = views[view][i], views[1 - view][i]
            negatives = [views[w][k] for w in (0, 1) for k in range(n) if k != i]
            sims = [(anchor * other).sum() for other in negatives]
            g = sum(torch.exp(s.detach() / tau[i]) for s in sims) / len(negatives)
            u = g if partition[i] == 0 else (1 - gamma) * partition[i] + gamma * g
            weights = [torch.exp(s.detach() / tau[i]) / u for s in sims]
            total = total + sum(w * s for w, s in zip(weights, sims)) / len(negatives) - (anchor * positive).sum()
            u_of_anchor.append(u)
            grad_of_anchor.append(
                torch.log(u) + rho - sum(w * s.detach() / tau[i] for w, s in zip(weights, sims)) / len(negatives)
            )
        new_u.append((u_of_anchor[0] + u_of_anchor[1]) / 2)
        tau_grads.append(((grad_of_anchor[0] + grad_of_anchor[1]) / 2).clamp(-clip, clip))
    return total / n, torch.stack(new_u).detach(), torch.stack(tau_grads).detach()


def robust_objective(z1, z2, tau, rho):
    """The paper's eq. 6 per image, summed over both anchors and averaged over images (no estimator)."""
    n = len(z1)
    u1, u2 = torch.nn.functional.normalize(z1, dim=1), torch.nn.functional.normalize(z2, dim=1)
    total = 0.0
    for i in range(n):
        for anchor, positive in ((u1[i], u2[i]), (u2[i], u1[i])):
            h = torch.stack([(anchor * other[k]).sum() - (anchor * positive).sum() for other in (u1, u2)
                             for k in range(n) if k != i])
            total = total + tau[i] * torch.log(torch.exp(h / tau[i]).mean()) + tau[i] * rho
    return total / n


def inputs(n, dim, seed, seen=True):
    generator = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, dim, generator=generator, dtype=torch.float64)
    z2 = torch.randn(n, dim, generator=generator, dtype=torch.float64)
    tau = 0.05 + 0.5 * torch.rand(n, generator=generator, dtype=torch.float64)
    partition = torch.rand(n, generator=generator, dtype=torch.float64) * 3 if seen else torch.zeros(n, dtype=torch.float64)
    return z1, z2, tau, partition


def value_grads_and_state(fn, z1, z2, *args):
    z1, z2 = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    loss, new_u, tau_grad = fn(z1, z2, *args)
    return (loss, *torch.autograd.grad(loss, (z1, z2)), new_u, tau_grad)


def assert_matches_reference(z1, z2, tau, partition, gamma=0.8, rho=0.4, clip=3.0):
    actual = value_grads_and_state(isogclr, z1, z2, tau, partition, gamma, rho, clip)
    expected = value_grads_and_state(reference_isogclr, z1, z2, tau, partition, gamma, rho, clip)
    for name, a, e in zip(("loss", "grad z1", "grad z2", "partition", "tau_grad"), actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("n, dim", [(2, 3), (5, 4), (8, 16)])
@pytest.mark.parametrize("gamma, rho", [(0.8, 0.4), (0.9, 0.1), (1.0, 0.6)])
def test_value_gradient_and_state_match_reference(n, dim, gamma, rho):
    assert_matches_reference(*inputs(n, dim, seed=10 * n + dim), gamma=gamma, rho=rho)


def test_first_visit_takes_the_batch_estimate_and_mixed_visits_match_reference():
    z1, z2, tau, partition = inputs(6, 5, seed=1, seen=False)
    partition[::2] = torch.tensor([0.5, 2.0, 7.0], dtype=torch.float64)  # half seen before, half new
    assert_matches_reference(z1, z2, tau, partition)
    fresh = isogclr(z1, z2, tau, torch.zeros(6, dtype=torch.float64), gamma=0.8)
    full = isogclr(z1, z2, tau, torch.zeros(6, dtype=torch.float64), gamma=1.0)
    torch.testing.assert_close(fresh.partition, full.partition, rtol=0, atol=0)


def test_identical_views_match_reference():
    z1, _, tau, partition = inputs(6, 5, seed=2)
    assert_matches_reference(z1, z1.clone(), tau, partition)


def test_with_exact_partition_the_surrogate_gradient_is_the_robust_objectives():
    # gamma = 1 (u = this batch's partition term): the surrogate's gradient with respect to the
    # embeddings, and the temperature gradient, are those of the robust loss itself (eq. 6).
    z1, z2, tau, partition = inputs(5, 4, seed=3)
    z1, z2, tau = z1.requires_grad_(True), z2.requires_grad_(True), tau.requires_grad_(True)
    step = isogclr(z1, z2, tau.detach(), partition, gamma=1.0, rho=0.3, tau_grad_clip=math.inf)
    surrogate_grads = torch.autograd.grad(step.loss, (z1, z2))
    objective = robust_objective(z1, z2, tau, rho=0.3)
    *objective_grads, tau_grad = torch.autograd.grad(objective, (z1, z2, tau))
    for a, e in zip(surrogate_grads, objective_grads):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)
    # d objective / d tau_i sums the two anchors over N images; the step returns their mean per image
    torch.testing.assert_close(step.tau_grad, tau_grad * len(z1) / 2, rtol=1e-10, atol=1e-12)


def test_temperature_gradient_is_clipped():
    z1, z2, tau, partition = inputs(4, 3, seed=4)
    unclipped = isogclr(z1, z2, tau, partition, tau_grad_clip=math.inf).tau_grad
    clipped = isogclr(z1, z2, tau, partition, tau_grad_clip=0.05).tau_grad
    torch.testing.assert_close(clipped, unclipped.clamp(-0.05, 0.05), rtol=0, atol=0)


def test_temperature_step_is_momentum_sgd_projected_onto_its_range():
    tau = torch.tensor([0.1, 0.06, 0.99, 0.5], dtype=torch.float64)
    momentum = torch.tensor([0.2, 1.0, -2.0, 0.0], dtype=torch.float64)
    grad = torch.tensor([1.0, 3.0, -3.0, -0.5], dtype=torch.float64)
    new_tau, new_momentum = isogclr_temperature_step(tau, momentum, grad, eta=0.03, beta=0.5, tau_min=0.05, tau_max=1.0)
    expected_momentum = [0.5 * m + 0.5 * g for m, g in zip(momentum.tolist(), grad.tolist())]
    expected_tau = [min(max(t - 0.03 * m, 0.05), 1.0) for t, m in zip(tau.tolist(), expected_momentum)]
    torch.testing.assert_close(new_momentum, torch.tensor(expected_momentum, dtype=torch.float64), rtol=0, atol=1e-15)
    torch.testing.assert_close(new_tau, torch.tensor(expected_tau, dtype=torch.float64), rtol=0, atol=1e-15)
    assert new_tau[1] == 0.05 and new_tau[2] == 1.0  # the projection binds at both ends


def test_a_batch_of_one_image_has_no_negatives_and_is_rejected():
    z1, z2, tau, partition = inputs(1, 4, seed=5)
    with pytest.raises(ValueError, match="at least 2 images in the global batch"):
        isogclr(z1, z2, tau, partition)


def test_invariant_to_projection_scale():
    z1, z2, tau, partition = inputs(5, 3, seed=6)
    scaled, plain = isogclr(3.0 * z1, 0.25 * z2, tau, partition), isogclr(z1, z2, tau, partition)
    for a, e in zip(scaled, plain):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_bfloat16_inputs_give_float32_loss_close_to_float64():
    z1, z2, tau, partition = inputs(32, 16, seed=7)
    low = isogclr(z1.bfloat16(), z2.bfloat16(), tau.float(), partition.float())
    assert low.loss.dtype == torch.float32
    exact = isogclr(z1.bfloat16().double(), z2.bfloat16().double(), tau, partition)
    torch.testing.assert_close(low.loss.double(), exact.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(low.partition.double(), exact.partition, rtol=1e-5, atol=0)


def test_autocast_does_not_lower_the_similarities():
    z1, z2, tau, partition = (x.float() for x in inputs(32, 16, seed=8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = isogclr(z1, z2, tau, partition)
    exact = isogclr(z1.double(), z2.double(), tau.double(), partition.double())
    torch.testing.assert_close(under_autocast.loss.double(), exact.loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "tau_shape, partition_shape, match",
    [((4,), (3,), r"partition of shape \[N\] = \(4,\), got \(3,\)"),
     ((4, 1), (4,), r"tau of shape \[N\] = \(4,\), got \(4, 1\)")],
)
def test_rejects_per_image_state_of_the_wrong_shape(tau_shape, partition_shape, match):
    with pytest.raises(ValueError, match=match):
        isogclr(torch.randn(4, 3), torch.randn(4, 3), torch.ones(tau_shape), torch.ones(partition_shape))


def test_rejects_bad_embedding_shapes_and_gamma():
    with pytest.raises(ValueError, match="same 2-D shape"):
        isogclr(torch.randn(4, 3), torch.randn(5, 3), torch.ones(4), torch.zeros(4))
    with pytest.raises(ValueError, match="0 < gamma <= 1, got 0"):
        isogclr(torch.randn(4, 3), torch.randn(4, 3), torch.ones(4), torch.zeros(4), gamma=0)


# ----------------------------------------------------------------- two ranks


def isogclr_on_one_rank(shards):
    z1, z2, tau, partition = (x.clone() for x in shards[dist.get_rank()])
    z1.requires_grad_(True), z2.requires_grad_(True)
    step = isogclr(z1, z2, tau, partition)
    grad1, grad2 = torch.autograd.grad(step.loss, (z1, z2))
    return {"loss": step.loss.detach(), "grad": grad1, "grad2": grad2, "partition": step.partition,
            "tau_grad": step.tau_grad}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("shard_sizes", [[3, 3], [2, 5]])
def test_two_ranks_see_the_global_batch(tmp_path, shard_sizes):
    z1, z2, tau, partition = inputs(sum(shard_sizes), 4, seed=9)
    partition[0] = 0.0  # one image on its first visit
    whole = value_grads_and_state(isogclr, z1, z2, tau, partition)
    shards = [tuple(x.split(shard_sizes)[r] for x in (z1, z2, tau, partition)) for r in range(WORLD_SIZE)]
    results = run_on_two_ranks(isogclr_on_one_rank, tmp_path, shards)
    assert_global_batch_value_and_gradients(results, whole[0], whole[1], shard_sizes)
    assert_global_batch_value_and_gradients([{**r, "grad": r["grad2"]} for r in results], whole[0], whole[2], shard_sizes)
    start = 0
    for result, size in zip(results, shard_sizes):  # the new state of each rank's own images
        torch.testing.assert_close(result["partition"], whole[3][start : start + size], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(result["tau_grad"], whole[4][start : start + size], rtol=1e-12, atol=1e-12)
        start += size
