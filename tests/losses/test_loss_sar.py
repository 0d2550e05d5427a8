"""SAR's reliable entropy (value and gradient against a float64 loop, two ranks against one process) and
its loss moving average (against the benchmark's ``update_ema`` with its nan skip)."""

import math

import pytest
import torch

from ssl_lightning.losses.eata import reliable_samples
from ssl_lightning.losses.sar import reliable_entropy_loss, update_loss_ema

from helpers.gloo import WORLD_SIZE, run_on_two_ranks
from helpers.tta import plain_entropy_rows as entropy_rows

E0 = 0.4 * math.log(4)


def reference_reliable_entropy(logits, margin):
    """The mean of the entropies below the margin, as a loop (0 when there is none)."""
    entropy = entropy_rows(logits)
    kept = [entropy[i] for i in range(len(logits)) if float(entropy[i]) < margin]
    return sum(kept) / len(kept) if kept else logits.sum() * 0


@pytest.mark.parametrize("seed,scale", [(0, 4.0), (1, 1.0), (2, 0.01)])  # 0.01: nothing reliable
def test_reliable_entropy_value_and_gradient_match_the_loop(seed, scale):
    logits = scale * torch.randn(6, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    leaf = logits.clone().requires_grad_(True)
    entropy = entropy_rows(leaf)
    loss, count = reliable_entropy_loss(entropy, reliable_samples(entropy, E0))
    (grad,) = torch.autograd.grad(loss, leaf)
    ref_leaf = logits.clone().requires_grad_(True)
    expected = reference_reliable_entropy(ref_leaf, E0)
    (expected_grad,) = torch.autograd.grad(expected, ref_leaf)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)
    assert count == sum(float(e) < E0 for e in entropy_rows(logits))


def reference_update_ema(ema, new_data, alpha=0.9):
    """The benchmark's update_ema (None: no average yet)."""
    return new_data if ema is None else alpha * ema + (1 - alpha) * new_data


def test_loss_ema_follows_the_benchmark_and_skips_batches_without_reliable_samples():
    losses = [0.8, float("nan"), 0.5, 0.3, float("nan"), 0.1]  # nan: the benchmark's empty mean
    ema, has = torch.tensor(0.0, dtype=torch.float64), torch.tensor(False)
    reference = None
    for value in losses:
        count = torch.tensor(0.0 if math.isnan(value) else 3.0)
        loss = torch.tensor(0.0 if math.isnan(value) else value, dtype=torch.float64)  # ours gives 0, count 0
        ema, has = update_loss_ema(ema, has, loss, count)
        if not math.isnan(value):
            reference = reference_update_ema(reference, value)
        assert bool(has) and ema.item() == pytest.approx(reference, rel=1e-12)


def test_no_reliable_batch_before_the_first_keeps_no_average():
    ema, has = update_loss_ema(torch.tensor(0.0), torch.tensor(False), torch.tensor(0.0), torch.tensor(0.0))
    assert not has and ema == 0


def test_non_scalar_inputs_are_refused():
    with pytest.raises(ValueError, match="scalar tensors"):
        update_loss_ema(torch.zeros(2), torch.tensor(False), torch.tensor(0.0), torch.tensor(1.0))
    with pytest.raises(ValueError, match="bool mask"):
        reliable_entropy_loss(torch.rand(3), torch.ones(3))


def _two_rank_worker(logits):
    import torch.distributed as dist

    part = [slice(0, 1), slice(1, len(logits))][dist.get_rank()]  # uneven shards: 1 and 4 rows
    leaf = logits[part].clone().requires_grad_(True)
    entropy = entropy_rows(leaf)
    loss, count = reliable_entropy_loss(entropy, reliable_samples(entropy, E0))
    (grad,) = torch.autograd.grad(loss, leaf)
    return {"loss": loss.detach(), "count": count, "grad": grad}


@pytest.mark.timeout(120)
def test_two_ranks_give_the_global_batch_value_and_gradient(tmp_path):
    logits = 3 * torch.randn(5, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    results = run_on_two_ranks(_two_rank_worker, tmp_path, logits)
    leaf = logits.clone().requires_grad_(True)
    entropy = entropy_rows(leaf)
    loss, count = reliable_entropy_loss(entropy, reliable_samples(entropy, E0))
    (grad,) = torch.autograd.grad(loss, leaf)
    assert 0 < count < 5  # some rows are filtered out
    for result, part in zip(results, [slice(0, 1), slice(1, 5)]):
        torch.testing.assert_close(result["loss"], loss.detach(), rtol=1e-12, atol=1e-14)
        assert result["count"] == count
        torch.testing.assert_close(result["grad"], WORLD_SIZE * grad[part], rtol=1e-10, atol=1e-12)
