import math

import pytest
import torch

from ssl_lightning.losses.dcl import dcl, dclw
from ssl_lightning.losses.nt_xent import nt_xent

from helpers.gloo import assert_global_batch_value_and_gradients, loss_on_one_rank, run_on_two_ranks


def reference_dcl(z1, z2, temperature, sigma=None):
    """Yeh et al. eq. 6 written out sample by sample; with ``sigma``, eq. 7's weights (DCLW):
    w = 2 - exp(sim(pair) / sigma) / mean over pairs of exp(sim(pair) / sigma), held constant."""
    samples = list(z1) + list(z2)
    unit = [v / torch.sqrt((v * v).sum()) for v in samples]
    n_pairs = len(z1)
    pair_weights = [1.0] * n_pairs
    if sigma is not None:
        scores = [torch.exp((unit[i] * unit[i + n_pairs]).sum().detach() / sigma) for i in range(n_pairs)]
        mean_score = sum(scores) / n_pairs
        pair_weights = [2 - score / mean_score for score in scores]
    total = 0.0
    for i in range(2 * n_pairs):
        positive = (i + n_pairs) % (2 * n_pairs)
        negatives = sum(
            torch.exp((unit[i] * unit[k]).sum() / temperature) for k in range(2 * n_pairs) if k not in (i, positive)
        )
        weight = pair_weights[i % n_pairs]
        total = total - weight * (unit[i] * unit[positive]).sum() / temperature + torch.log(negatives)
    return total / (2 * n_pairs)


def value_and_grads(loss_fn, z1, z2, *args):
    z1 = z1.clone().requires_grad_(True)
    z2 = z2.clone().requires_grad_(True)
    loss = loss_fn(z1, z2, *args)
    return (loss, *torch.autograd.grad(loss, (z1, z2)))


def assert_same_value_and_grads(actual, expected):
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


def random_pairs(n_pairs, dim, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, n_pairs, dim, generator=generator, dtype=torch.float64)


@pytest.mark.parametrize("n_pairs, dim", [(2, 3), (5, 4), (8, 16)])
@pytest.mark.parametrize("temperature", [0.05, 0.1, 0.5, 2.0])
def test_dcl_value_and_gradient_match_reference(n_pairs, dim, temperature):
    z1, z2 = random_pairs(n_pairs, dim, n_pairs * 100 + dim)
    assert_same_value_and_grads(value_and_grads(dcl, z1, z2, temperature),
                                value_and_grads(reference_dcl, z1, z2, temperature))


@pytest.mark.parametrize("n_pairs, dim", [(2, 3), (5, 4), (8, 16)])
@pytest.mark.parametrize("sigma", [0.1, 0.5, 2.0])
def test_dclw_value_and_gradient_match_reference(n_pairs, dim, sigma):
    z1, z2 = random_pairs(n_pairs, dim, n_pairs * 10 + dim)
    assert_same_value_and_grads(value_and_grads(dclw, z1, z2, 0.1, sigma),
                                value_and_grads(reference_dcl, z1, z2, 0.1, sigma))


def test_identical_views_match_reference():
    z = torch.randn(6, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert_same_value_and_grads(value_and_grads(dcl, z, z.clone(), 0.1), value_and_grads(reference_dcl, z, z.clone(), 0.1))
    # Identical views: every positive similarity is 1, so the weights are all 1 and DCLW is DCL.
    torch.testing.assert_close(dclw(z, z.clone()), dcl(z, z.clone()), rtol=1e-12, atol=0)


def test_equals_infonce_with_the_positive_dropped_from_the_denominator():
    # Plain matrix computation: all 2N' x 2N' similarities, self and positive removed from the log-sum-exp.
    z1, z2 = random_pairs(7, 5, 3)
    u = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    logits = u @ u.T / 0.2
    positive = torch.arange(14).roll(7)
    positive_logit = logits[torch.arange(14), positive]
    without_positive = logits.clone()
    without_positive[torch.arange(14), positive] = float("-inf")
    without_positive.fill_diagonal_(float("-inf"))
    expected = (torch.logsumexp(without_positive, dim=1) - positive_logit).mean()
    torch.testing.assert_close(dcl(z1, z2, 0.2), expected, rtol=1e-12, atol=0)
    # ...and NT-Xent's denominator is DCL's plus the positive: NT-Xent = DCL + mean log(1 + e^{pos} / negatives).
    coupling = torch.log1p(torch.exp(positive_logit - torch.logsumexp(without_positive, dim=1))).mean()
    torch.testing.assert_close(nt_xent(z1, z2, 0.2), expected + coupling, rtol=1e-12, atol=0)


def test_dclw_tends_to_dcl_as_sigma_grows():
    z1, z2 = random_pairs(6, 4, 4)
    torch.testing.assert_close(dclw(z1, z2, 0.1, sigma=1e9), dcl(z1, z2, 0.1), rtol=1e-8, atol=0)
    assert not torch.allclose(dclw(z1, z2, 0.1, sigma=0.5), dcl(z1, z2, 0.1))


def test_dclw_weights_are_not_backpropagated():
    # The gradient equals that of DCL with the weights computed beforehand and fed in as constants.
    z1, z2 = random_pairs(5, 3, 5)
    unit1, unit2 = torch.nn.functional.normalize(z1, dim=1), torch.nn.functional.normalize(z2, dim=1)
    fixed = 2 - 5 * torch.softmax((unit1 * unit2).sum(1) / 0.5, dim=0)
    assert_same_value_and_grads(value_and_grads(dclw, z1, z2, 0.1, 0.5),
                                value_and_grads(dcl, z1, z2, 0.1, lambda u1, u2: fixed))


def test_a_batch_of_one_pair_has_no_negatives_and_is_refused():
    z1, z2 = torch.randn(2, 1, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="at least 2 pairs in the global batch, got 1.*no negatives"):
        dcl(z1, z2)
    with pytest.raises(ValueError, match="at least 2 pairs"):
        dclw(z1, z2)


def test_two_pairs_have_two_negatives_each():
    # The smallest batch: the denominator of every sample is its two views of the other image.
    z1, z2 = random_pairs(2, 3, 6)
    assert_same_value_and_grads(value_and_grads(dcl, z1, z2, 0.5), value_and_grads(reference_dcl, z1, z2, 0.5))


def test_large_temperature_tends_to_log_of_the_negative_count():
    z1, z2 = random_pairs(7, 4, 1)
    torch.testing.assert_close(dcl(z1, z2, 1e4).item(), math.log(2 * 7 - 2), rtol=1e-3, atol=0)


def test_invariant_to_projection_scale():
    z1, z2 = random_pairs(5, 3, 2)
    torch.testing.assert_close(dcl(3.0 * z1, 0.25 * z2), dcl(z1, z2), rtol=1e-12, atol=0)
    torch.testing.assert_close(dclw(3.0 * z1, 0.25 * z2), dclw(z1, z2), rtol=1e-12, atol=0)


@pytest.mark.parametrize("loss_fn", [dcl, dclw])
def test_bfloat16_inputs_give_float32_loss_close_to_float64(loss_fn):
    z1, z2 = random_pairs(64, 32, 3)
    low = loss_fn(z1.bfloat16(), z2.bfloat16())
    assert low.dtype == torch.float32
    torch.testing.assert_close(low.double(), loss_fn(z1.bfloat16().double(), z2.bfloat16().double()), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss_fn", [dcl, dclw])
def test_autocast_does_not_lower_the_similarity_matmul(loss_fn):
    z1, z2 = random_pairs(64, 32, 4).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = loss_fn(z1, z2, 0.05)
    torch.testing.assert_close(under_autocast.double(), loss_fn(z1.double(), z2.double(), 0.05), rtol=1e-5, atol=1e-6)


def test_rejects_bad_shapes_and_parameters():
    with pytest.raises(ValueError, match=r"dcl expects z1 and z2 of the same 2-D shape.*\(4, 3\) and \(5, 3\)"):
        dcl(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="temperature > 0, got 0"):
        dcl(torch.randn(4, 3), torch.randn(4, 3), temperature=0)
    with pytest.raises(ValueError, match="sigma > 0, got -1"):
        dclw(torch.randn(4, 3), torch.randn(4, 3), sigma=-1)


@pytest.mark.ddp
@pytest.mark.timeout(120)
@pytest.mark.parametrize("shard_sizes", [[4, 4], [3, 5]], ids=["equal", "uneven"])
@pytest.mark.parametrize("loss_fn", [dcl, dclw])
def test_two_ranks_give_the_global_batch_value_and_gradients(tmp_path, loss_fn, shard_sizes):
    # The gradient is taken with respect to z1; z2 is the shard's second views (DCLW's weights need the
    # softmax over the global batch, not each rank's).
    z1, z2 = random_pairs(sum(shard_sizes), 5, 7)
    shards = list(zip(z1.split(shard_sizes), z2.split(shard_sizes)))
    results = run_on_two_ranks(loss_on_one_rank, tmp_path, loss_fn, shards, 0.1)
    z1 = z1.clone().requires_grad_(True)
    loss = loss_fn(z1, z2, 0.1)
    (grad,) = torch.autograd.grad(loss, z1)
    assert_global_batch_value_and_gradients(results, loss, grad, shard_sizes)
