import math

import pytest
import torch

from ssl_lightning.losses.nt_xent import nt_xent
from ssl_lightning.losses.supcon import supcon

from helpers.gloo import assert_global_batch_value_and_gradients, loss_on_one_rank, run_on_two_ranks


def reference_supcon(z1, z2, labels, temperature):
    """Khosla et al. eq. 2 (L_out) written out anchor by anchor: positives are the anchor's other
    view and every other sample of the same class; label -1 matches nothing."""
    samples = list(z1) + list(z2)
    sample_labels = [int(label) for label in labels] * 2
    unit = [v / torch.sqrt((v * v).sum()) for v in samples]
    n_samples = len(samples)
    total = 0.0
    for i in range(n_samples):
        other_view = (i + len(z1)) % n_samples
        positives = [
            p for p in range(n_samples)
            if p != i and (p == other_view or (sample_labels[i] >= 0 and sample_labels[p] == sample_labels[i]))
        ]
        denominator = sum(torch.exp((unit[i] * unit[k]).sum() / temperature) for k in range(n_samples) if k != i)
        log_probs = [(unit[i] * unit[p]).sum() / temperature - torch.log(denominator) for p in positives]
        total = total - sum(log_probs) / len(positives)
    return total / n_samples


def value_and_grads(loss_fn, z1, z2, *args):
    z1 = z1.clone().requires_grad_(True)
    z2 = z2.clone().requires_grad_(True)
    loss = loss_fn(z1, z2, *args)
    return (loss, *torch.autograd.grad(loss, (z1, z2)))


def assert_matches_reference(z1, z2, labels, temperature=0.1):
    actual = value_and_grads(supcon, z1, z2, labels, temperature)
    expected = value_and_grads(reference_supcon, z1, z2, labels, temperature)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


def random_pairs(n_pairs, dim, seed):
    return torch.randn(2, n_pairs, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize(
    "labels",
    [[0, 1, 0, 2, 1, 0], [3, 3, 3, 3, 3, 3], [-1, -1, -1, -1, -1, -1], [-1, 2, -1, 2, 0, -1], [0, 1, 2, 3, 4, 5]],
    ids=["classes", "every_label_equal", "unlabelled", "mixed", "all_distinct"],
)
@pytest.mark.parametrize("temperature", [0.07, 0.1, 0.5])
def test_value_and_gradient_match_reference(labels, temperature):
    z1, z2 = random_pairs(6, 4, len(set(labels)))
    assert_matches_reference(z1, z2, torch.tensor(labels), temperature)


def test_identical_views_match_reference():
    z = torch.randn(6, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert_matches_reference(z, z.clone(), torch.tensor([1, 0, 1, -1, 0, 1]))


@pytest.mark.parametrize("labels", [[-1] * 5, [0, 1, 2, 3, 4]], ids=["unlabelled", "all_distinct"])
def test_without_shared_labels_equals_nt_xent(labels):
    # -1 never matches -1, so unlabelled images are each other's negatives exactly as in SimCLR.
    z1, z2 = random_pairs(5, 4, 1)
    actual = value_and_grads(supcon, z1, z2, torch.tensor(labels), 0.1)
    expected = value_and_grads(nt_xent, z1, z2, 0.1)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-14)


def test_every_label_equal_averages_the_log_probability_over_all_other_samples():
    # Every other sample is a positive: l_i = logsumexp_{k != i}(s_ik) - mean_{k != i}(s_ik).
    z1, z2 = random_pairs(4, 3, 2)
    u = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    logits = u @ u.T / 0.1
    others = ~torch.eye(8, dtype=torch.bool)
    expected = torch.stack([torch.logsumexp(row[keep], 0) - row[keep].mean() for row, keep in zip(logits, others)]).mean()
    torch.testing.assert_close(supcon(z1, z2, torch.full((4,), 2)), expected, rtol=1e-12, atol=0)


def test_a_batch_of_one_pair_has_zero_loss():
    # The other view is the whole denominator and the only positive.
    z1, z2 = random_pairs(1, 4, 3)
    for label in (-1, 0):
        assert supcon(z1, z2, torch.tensor([label])).item() == 0.0


def test_large_temperature_with_every_label_equal_tends_to_log_of_the_sample_count():
    z1, z2 = random_pairs(6, 4, 4)
    torch.testing.assert_close(supcon(z1, z2, torch.zeros(6, dtype=torch.long), 1e4).item(), math.log(11), rtol=1e-3, atol=0)


def test_bfloat16_inputs_give_float32_loss_close_to_float64():
    z1, z2 = random_pairs(64, 32, 5)
    labels = torch.arange(64) % 10
    low = supcon(z1.bfloat16(), z2.bfloat16(), labels)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low.double(), supcon(z1.bfloat16().double(), z2.bfloat16().double(), labels), rtol=1e-5, atol=0)


def test_autocast_does_not_lower_the_similarity_matmul():
    z1, z2 = random_pairs(64, 32, 6).float()
    labels = torch.arange(64) % 10
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = supcon(z1, z2, labels, 0.05)
    torch.testing.assert_close(under_autocast.double(), supcon(z1.double(), z2.double(), labels, 0.05), rtol=1e-5, atol=0)


def test_rejects_bad_inputs():
    z = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"supcon expects z1 and z2 of the same 2-D shape"):
        supcon(z, torch.randn(5, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels as an integer tensor of shape \[N\] = \(4,\).*torch.float32 of shape \(4,\)"):
        supcon(z, z, torch.zeros(4))
    with pytest.raises(ValueError, match=r"labels as an integer tensor.*shape \(3,\)"):
        supcon(z, z, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature > 0, got 0"):
        supcon(z, z, torch.zeros(4, dtype=torch.long), temperature=0)


@pytest.mark.ddp
@pytest.mark.timeout(120)
@pytest.mark.parametrize("shard_sizes", [[4, 4], [3, 5]], ids=["equal", "uneven"])
def test_two_ranks_give_the_global_batch_value_and_gradients(tmp_path, shard_sizes):
    # Classes shared across ranks, and unlabelled rows on both: positives come from the gathered labels.
    z1, z2 = random_pairs(sum(shard_sizes), 5, 7)
    labels = torch.tensor([0, 1, -1, 2, 0, -1, 1, 2])
    shards = list(zip(z1.split(shard_sizes), z2.split(shard_sizes), labels.split(shard_sizes)))
    results = run_on_two_ranks(loss_on_one_rank, tmp_path, supcon, shards, 0.1)
    z1 = z1.clone().requires_grad_(True)
    loss = supcon(z1, z2, labels, 0.1)
    (grad,) = torch.autograd.grad(loss, z1)
    assert_global_batch_value_and_gradients(results, loss, grad, shard_sizes)
