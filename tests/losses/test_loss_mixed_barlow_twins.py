import pytest
import torch

from ssl_lightning.losses.mixed_barlow_twins import mixed_barlow_twins_regulariser

from helpers.gloo import WORLD_SIZE, run_on_two_ranks


def standardise(z, eps):
    """Per dimension over the batch, biased variance, eps inside the root (BatchNorm's, as in barlow_twins)."""
    n, dim = z.shape
    columns = []
    for j in range(dim):
        mean = sum(z[b, j] for b in range(n)) / n
        variance = sum((z[b, j] - mean) ** 2 for b in range(n)) / n
        columns.append(torch.stack([(z[b, j] - mean) / torch.sqrt(variance + eps) for b in range(n)]))
    return torch.stack(columns, dim=1)


def correlation(x, y):
    """C[i, j] = sum_b x[b, i] y[b, j] / N, entry by entry."""
    n, dim = x.shape
    return torch.stack(
        [torch.stack([sum(x[b, i] * y[b, j] for b in range(n)) / n for j in range(dim)]) for i in range(dim)]
    )


def reference_regulariser(z1, z2, z_mixed, perm, mix_ratio, eps=1e-5):
    """mix-bt main.py's cc_m_1, cc_m_1_gt, cc_m_2, cc_m_2_gt, written as the four correlations;
    ``mix_ratio`` per row (a list) or one number."""
    n = z1.shape[0]
    ratios = mix_ratio if isinstance(mix_ratio, list) else [mix_ratio] * n
    zn1, zn2, zn_mixed = standardise(z1, eps), standardise(z2, eps), standardise(z_mixed, eps)
    zn2_shuffled = torch.stack([zn2[perm[b]] for b in range(n)])
    weights = torch.tensor(ratios, dtype=z1.dtype)[:, None]
    # With one ratio the ground truths are lambda C(., .) + (1 - lambda) C(., .); per row the
    # ratio moves inside the sum over the batch.
    cc_m_1 = correlation(zn_mixed, zn1)
    cc_m_1_gt = correlation(weights * zn1, zn1) + correlation((1 - weights) * zn2_shuffled, zn1)
    cc_m_2 = correlation(zn_mixed, zn2)
    cc_m_2_gt = correlation(weights * zn1, zn2) + correlation((1 - weights) * zn2_shuffled, zn2)
    return (cc_m_1 - cc_m_1_gt).pow(2).sum() + (cc_m_2 - cc_m_2_gt).pow(2).sum()


def mix_bt_main_py(z1, z2, z_mixed, perm, alpha):
    """The regulariser exactly as github.com/wgcban/mix-bt main.py computes it (before its weights)."""
    batch_size = z1.shape[0]
    out_1_norm = (z1 - z1.mean(dim=0)) / z1.std(dim=0)
    out_2_norm = (z2 - z2.mean(dim=0)) / z2.std(dim=0)
    out_m_norm = (z_mixed - z_mixed.mean(dim=0)) / z_mixed.std(dim=0)
    cc_m_1 = torch.matmul(out_m_norm.T, out_1_norm) / batch_size
    cc_m_1_gt = alpha * torch.matmul(out_1_norm.T, out_1_norm) / batch_size + \
        (1 - alpha) * torch.matmul(out_2_norm[perm, :].T, out_1_norm) / batch_size
    cc_m_2 = torch.matmul(out_m_norm.T, out_2_norm) / batch_size
    cc_m_2_gt = alpha * torch.matmul(out_1_norm.T, out_2_norm) / batch_size + \
        (1 - alpha) * torch.matmul(out_2_norm[perm, :].T, out_2_norm) / batch_size
    return (cc_m_1 - cc_m_1_gt).pow(2).sum() + (cc_m_2 - cc_m_2_gt).pow(2).sum()


def random_triple(batch, dim, seed):
    generator = torch.Generator().manual_seed(seed)
    scale = 1 + 3 * torch.rand(dim, generator=generator, dtype=torch.float64)
    z1 = 2 + scale * torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    z2 = z1 + 0.5 * torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    z_mixed = torch.randn(batch, dim, generator=generator, dtype=torch.float64) + z1
    perm = torch.randperm(batch, generator=generator)
    return z1, z2, z_mixed, perm


def value_and_grads(loss_fn, z1, z2, z_mixed, perm, mix_ratio, *args):
    inputs = [z.clone().requires_grad_(True) for z in (z1, z2, z_mixed)]
    loss = loss_fn(*inputs, perm, mix_ratio, *args)
    return (loss, *torch.autograd.grad(loss, inputs))


def assert_same(actual, expected):
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("batch, dim", [(2, 1), (2, 3), (5, 4), (8, 6)])
@pytest.mark.parametrize("mix_ratio", [0.0, 0.3, 0.85, 1.0])
def test_value_and_gradient_match_reference(batch, dim, mix_ratio):
    z1, z2, z_mixed, perm = random_triple(batch, dim, seed=batch * 100 + dim)
    assert_same(value_and_grads(mixed_barlow_twins_regulariser, z1, z2, z_mixed, perm, mix_ratio),
                value_and_grads(reference_regulariser, z1, z2, z_mixed, perm, mix_ratio))


def test_one_ratio_per_row_matches_reference():
    z1, z2, z_mixed, perm = random_triple(6, 4, seed=3)
    ratios = [0.1, 0.1, 0.1, 0.7, 0.7, 0.7]
    assert_same(
        value_and_grads(mixed_barlow_twins_regulariser, z1, z2, z_mixed, perm, torch.tensor(ratios, dtype=torch.float64)),
        value_and_grads(reference_regulariser, z1, z2, z_mixed, perm, ratios),
    )


def test_a_0d_tensor_ratio_equals_the_number():
    z1, z2, z_mixed, perm = random_triple(6, 4, seed=4)
    assert_same(
        value_and_grads(mixed_barlow_twins_regulariser, z1, z2, z_mixed, perm, torch.tensor(0.4, dtype=torch.float64)),
        value_and_grads(mixed_barlow_twins_regulariser, z1, z2, z_mixed, perm, 0.4),
    )


def test_equals_mix_bt_main_py_up_to_its_unbiased_standardisation():
    # Without eps our standardised embeddings are main.py's times sqrt(N / (N - 1)), so every
    # correlation, and each difference, is N / (N - 1) times main.py's.
    z1, z2, z_mixed, perm = random_triple(32, 16, seed=0)
    n = z1.shape[0]
    ours = value_and_grads(mixed_barlow_twins_regulariser, z1, z2, z_mixed, perm, 0.37, 0.0)
    theirs = value_and_grads(mix_bt_main_py, z1, z2, z_mixed, perm, 0.37)
    assert_same(ours, tuple((n / (n - 1)) ** 2 * t for t in theirs))


def test_no_penalty_when_the_mixed_embedding_is_an_end_point():
    # lambda = 1 mixes nothing of x2, lambda = 0 is x2[perm]: embedding them as z1 and z2[perm]
    # is exactly linear, so both correlations meet their targets.
    z1, z2, _, perm = random_triple(7, 5, seed=5)
    assert mixed_barlow_twins_regulariser(z1, z2, z1.clone(), perm, 1.0).item() < 1e-20
    assert mixed_barlow_twins_regulariser(z1, z2, z2[perm].clone(), perm, 0.0).item() < 1e-20


def test_bfloat16_inputs_give_float32_loss_close_to_float64():
    z1, z2, z_mixed, perm = random_triple(64, 8, seed=2)
    low = mixed_barlow_twins_regulariser(z1.bfloat16(), z2.bfloat16(), z_mixed.bfloat16(), perm, 0.3)
    assert low.dtype == torch.float32
    exact = mixed_barlow_twins_regulariser(z1.bfloat16().double(), z2.bfloat16().double(),
                                           z_mixed.bfloat16().double(), perm, 0.3)
    torch.testing.assert_close(low.double(), exact, rtol=1e-4, atol=1e-7)


def test_autocast_does_not_lower_the_correlation_matmuls():
    z1, z2, z_mixed, perm = random_triple(64, 32, seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = mixed_barlow_twins_regulariser(z1.float(), z2.float(), z_mixed.float(), perm, 0.3)
    exact = mixed_barlow_twins_regulariser(z1.float().double(), z2.float().double(), z_mixed.float().double(),
                                           perm, 0.3)
    torch.testing.assert_close(under_autocast.double(), exact, rtol=1e-4, atol=0)


@pytest.mark.parametrize(
    "shapes, perm, ratio, match",
    [
        (((4, 3), (5, 3), (4, 3)), torch.arange(4), 0.5, r"z1 and z2 of the same 2-D shape.*\(4, 3\) and \(5, 3\)"),
        (((4, 3), (4, 3), (4, 2)), torch.arange(4), 0.5, r"z1 and z_mixed of the same 2-D shape"),
        (((1, 3), (1, 3), (1, 3)), torch.arange(1), 0.5, r"at least 2 samples per process.*\(1, 3\)"),
        (((4, 3), (4, 3), (4, 3)), torch.arange(3), 0.5, r"perm to be the \[N\] = \[4\] integer permutation"),
        (((4, 3), (4, 3), (4, 3)), torch.arange(4.0), 0.5, r"integer permutation.*torch.float32"),
        (((4, 3), (4, 3), (4, 3)), torch.arange(4), torch.ones(3), r"one value per row \(\[4\]\).*\(3,\)"),
    ],
)
def test_rejects_bad_inputs(shapes, perm, ratio, match):
    with pytest.raises(ValueError, match=match):
        mixed_barlow_twins_regulariser(*(torch.randn(shape) for shape in shapes), perm, ratio)


def regulariser_on_one_rank(shards):
    """Gloo worker: this rank's shard, its own permutation and its own lambda."""
    import torch.distributed as dist

    z1, z2, z_mixed, perm, mix_ratio = shards[dist.get_rank()]
    inputs = [z.clone().requires_grad_(True) for z in (z1, z2, z_mixed)]
    loss = mixed_barlow_twins_regulariser(*inputs, perm, mix_ratio)
    return {"loss": loss.detach(), "grads": torch.autograd.grad(loss, inputs)}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("shard_sizes", [[4, 4], [3, 5]], ids=["equal", "uneven"])
def test_two_ranks_match_one_process_on_the_global_batch(tmp_path, shard_sizes):
    z1, z2, z_mixed, _ = random_triple(sum(shard_sizes), 5, seed=9)
    # Each rank mixes its own images with its own permutation and lambda: on the concatenated
    # batch that is the block-diagonal permutation and one lambda per row.
    generator = torch.Generator().manual_seed(10)
    perms = [torch.randperm(size, generator=generator) for size in shard_sizes]
    ratios = [0.2, 0.9]
    shards = [
        (a, b, m, perm, ratio)
        for a, b, m, perm, ratio in zip(
            z1.split(shard_sizes), z2.split(shard_sizes), z_mixed.split(shard_sizes), perms, ratios
        )
    ]
    results = run_on_two_ranks(regulariser_on_one_rank, tmp_path, shards)

    global_perm = torch.cat([perm + sum(shard_sizes[:rank]) for rank, perm in enumerate(perms)])
    row_ratios = torch.cat([torch.full((size,), ratio, dtype=torch.float64) for size, ratio in zip(shard_sizes, ratios)])
    loss, *grads = value_and_grads(mixed_barlow_twins_regulariser, z1, z2, z_mixed, global_perm, row_ratios)
    start = 0
    for result, size in zip(results, shard_sizes):
        torch.testing.assert_close(result["loss"], loss, rtol=1e-10, atol=1e-12)
        for got, full in zip(result["grads"], grads, strict=True):
            torch.testing.assert_close(got, WORLD_SIZE * full[start : start + size], rtol=1e-10, atol=1e-12)
        start += size
