import pytest
import torch
import torch.nn.functional as F

from ssl_lightning.losses.mochi import mix_hard_negatives


def unit(v):
    return v / torch.sqrt((v * v).sum())


def reference_mix_hard_negatives(query, negatives, num_hardest, num_mixed, num_query_mixed, generator):
    """The paper's recipe query by query: sort the negatives by similarity, keep the N hardest, mix
    pairs of them (a ~ U(0, 1)) and the query with one of them (b ~ U(0, 0.5)). The random numbers
    are drawn as the function documents (pair indices, a, query-mix indices, b)."""
    batch = len(query)
    pair_positions = torch.randint(num_hardest, (batch, num_mixed, 2), generator=generator)
    a = torch.rand(batch, num_mixed, 1, generator=generator, dtype=query.dtype)
    partner_positions = torch.randint(num_hardest, (batch, num_query_mixed), generator=generator)
    b = 0.5 * torch.rand(batch, num_query_mixed, 1, generator=generator, dtype=query.dtype)
    out = []
    for i in range(batch):
        q = unit(query[i])
        by_hardness = sorted(range(len(negatives)), key=lambda j: -float((q * negatives[j]).sum()))
        hardest = [negatives[j] for j in by_hardness[:num_hardest]]
        rows = []
        for m in range(num_mixed):
            first, second = hardest[pair_positions[i, m, 0]], hardest[pair_positions[i, m, 1]]
            rows.append(unit(a[i, m, 0] * first + (1 - a[i, m, 0]) * second))
        for m in range(num_query_mixed):
            partner = hardest[partner_positions[i, m]]
            rows.append(unit(b[i, m, 0] * q + (1 - b[i, m, 0]) * partner))
        out.append(torch.stack(rows) if rows else query.new_zeros(0, query.shape[1]))
    return torch.stack(out)


def random_inputs(batch, k, dim, seed):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    negatives = F.normalize(torch.randn(k, dim, generator=generator, dtype=torch.float64), dim=1)
    return query, negatives


def hardest_set(query, negatives, num_hardest):
    return (F.normalize(query, dim=1) @ negatives.T).topk(num_hardest, dim=1).indices


@pytest.mark.parametrize("batch, k, dim, n, s, s_query", [(1, 6, 3, 4, 5, 2), (4, 20, 5, 8, 6, 3), (3, 10, 4, 10, 0, 4),
                                                          (3, 10, 4, 1, 3, 0)])
def test_matches_a_plain_loop_with_the_same_seed(batch, k, dim, n, s, s_query):
    query, negatives = random_inputs(batch, k, dim, seed=batch * 10 + k)
    got = mix_hard_negatives(query, negatives, n, s, s_query, generator=torch.Generator().manual_seed(7))
    expected = reference_mix_hard_negatives(query, negatives, n, s, s_query, torch.Generator().manual_seed(7))
    assert got.shape == (batch, s + s_query, dim) and got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_synthetic_negatives_are_unit_vectors_without_gradient():
    query, negatives = random_inputs(5, 40, 8, seed=1)
    query.requires_grad_(True)
    negatives.requires_grad_(True)
    mixed = mix_hard_negatives(query, negatives, 10, 12, 6)
    assert mixed.shape == (5, 18, 8) and not mixed.requires_grad
    torch.testing.assert_close(mixed.norm(dim=2), torch.ones(5, 18, dtype=torch.float64))


def solve_convex_pair(target, first, second):
    """The a >= 0 with target parallel to a first + (1 - a) second, or None when there is none."""
    difference = first - second
    # target = c (second + a difference) for some c > 0: least squares on [difference, second]
    coefficients = torch.linalg.lstsq(torch.stack([difference, second], dim=1), target[:, None]).solution[:, 0]
    if not torch.allclose(torch.stack([difference, second], dim=1) @ coefficients, target, atol=1e-9):
        return None
    scale = coefficients[1]
    return float(coefficients[0] / scale) if scale > 0 else None


def test_each_mixture_is_a_convex_combination_of_two_hardest_or_of_the_query_and_one():
    batch, k, dim, n, s, s_query = 3, 30, 6, 5, 8, 4
    query, negatives = random_inputs(batch, k, dim, seed=2)
    mixed = mix_hard_negatives(query, negatives, n, s, s_query, generator=torch.Generator().manual_seed(3))
    hardest = hardest_set(query, negatives, n)
    for i in range(batch):
        pool = [negatives[j] for j in hardest[i]]
        for row in mixed[i, :s]:
            weights = [solve_convex_pair(row, x, y) for x in pool for y in pool if x is not y]
            assert any(w is not None and 0 <= w <= 1 for w in weights), "not a mixture of two of the N hardest"
        q = F.normalize(query[i], dim=0)
        for row in mixed[i, s:]:
            weights = [solve_convex_pair(row, q, x) for x in pool]
            assert any(w is not None and 0 <= w <= 0.5 for w in weights), "not a query mixture with b < 0.5"


def test_only_the_hardest_negatives_are_mixed():
    # One negative far harder than the rest: with N = 1 every pair mixture is that negative itself.
    query, negatives = random_inputs(2, 12, 4, seed=4)
    negatives[3] = F.normalize(query[0], dim=0)
    negatives[7] = F.normalize(query[1], dim=0)
    mixed = mix_hard_negatives(query, negatives, 1, 5, 0)
    torch.testing.assert_close(mixed[0], negatives[3].expand(5, 4))
    torch.testing.assert_close(mixed[1], negatives[7].expand(5, 4))


def test_global_rng_draws_are_reproducible_and_vary():
    query, negatives = random_inputs(4, 20, 5, seed=5)
    torch.manual_seed(0)
    first = mix_hard_negatives(query, negatives, 6, 4, 2)
    second = mix_hard_negatives(query, negatives, 6, 4, 2)
    torch.manual_seed(0)
    assert torch.equal(mix_hard_negatives(query, negatives, 6, 4, 2), first)
    assert not torch.equal(first, second)


def test_bfloat16_query_and_autocast_give_float32_mixtures():
    query, negatives = random_inputs(4, 20, 5, seed=6)
    assert mix_hard_negatives(query.bfloat16(), negatives.float(), 6, 4, 2).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert mix_hard_negatives(query.float(), negatives.float(), 6, 4, 2).dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_hardest": 21}, r"num_hardest <= the 20 negatives, got num_hardest=21"),
        ({"num_hardest": 0}, r"num_hardest <= the 20 negatives, got num_hardest=0"),
        ({"num_mixed": -1}, r"num_mixed, num_query_mixed >= 0, got -1, 2"),
    ],
)
def test_rejects_bad_arguments(kwargs, match):
    query, negatives = random_inputs(4, 20, 5, seed=7)
    arguments = {"num_hardest": 6, "num_mixed": 4, "num_query_mixed": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        mix_hard_negatives(query, negatives, **arguments)


def test_rejects_mismatched_widths():
    with pytest.raises(ValueError, match=r"same width, got \(4, 5\) and \(20, 3\)"):
        mix_hard_negatives(torch.randn(4, 5), torch.randn(20, 3), 6, 4, 2)
