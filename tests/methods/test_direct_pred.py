"""DirectPred (Tian, Chen and Ganguli, ICML 2021): the predictor is set from the EMA correlation F of
its inputs, W_p = U diag(sqrt(s / max s) + eps) U^T, never trained; an option of SimSiam and BYOL."""

import numpy as np
import pytest
import torch

from ssl_lightning.components.direct_pred import DirectPredictor
from ssl_lightning.methods.ssl.byol import BYOL
from ssl_lightning.methods.ssl.simsiam import SimSiam

from helpers.fakes import fake_loader, quick_trainer, tiny_method
from helpers.gloo import run_on_two_ranks
from helpers.short_fit import LOG_EVERY, syncs_per_step

RHO, EPS = 0.3, 0.01


def reference_correlation(batches: list[list[np.ndarray]], rho: float) -> np.ndarray:
    """The official Accumulator: the first batch's mean f f^T, then F <- rho F + (1 - rho) mean f f^T,
    the mean over the rows of every view of the batch."""
    correlation = None
    for views in batches:
        rows = [row for view in views for row in view]
        batch = sum(np.outer(row, row) for row in rows) / len(rows)
        correlation = batch if correlation is None else rho * correlation + (1 - rho) * batch
    return correlation


def reference_predictor(correlation: np.ndarray, eps: float) -> np.ndarray:
    """Eq. 19 with the official boost_scale: p_j = sqrt(max(s_j, 0) / max_k s_k) + eps (floored at 1e-4)."""
    eigenvalues, eigenvectors = np.linalg.eigh(correlation)
    boosted = np.maximum(np.sqrt(np.maximum(eigenvalues, 0) / eigenvalues.max()) + eps, 1e-4)
    return eigenvectors @ np.diag(boosted) @ eigenvectors.T


def random_views(seed: int, rows: int, dim: int, num_views: int = 2) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, dim, generator=generator, dtype=torch.float64) for _ in range(num_views)]


def test_predictor_is_the_formula_of_the_ema_correlation():
    predictor = DirectPredictor(5, rho=RHO, eps=EPS).double()
    batches = [random_views(seed, rows=4, dim=5) for seed in range(4)]
    for views in batches:
        predictor.observe(*views)
    expected_correlation = reference_correlation([[v.numpy() for v in views] for views in batches], RHO)
    np.testing.assert_allclose(predictor.correlation.numpy(), expected_correlation, rtol=1e-12, atol=1e-14)

    predictor.refresh()
    np.testing.assert_allclose(predictor.weight.numpy(), reference_predictor(expected_correlation, EPS),
                               rtol=1e-10, atol=1e-12)
    assert predictor.num_observed.item() == 4


def test_a_negative_eigenvalue_is_clipped_to_zero():
    # An EMA of f f^T is positive semi-definite; a loaded or numerically perturbed F need not be.
    rotation, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((4, 4)))
    correlation = rotation @ np.diag([2.0, 0.5, 0.08, -0.3]) @ rotation.T
    predictor = DirectPredictor(4, eps=EPS).double()
    predictor.correlation.copy_(torch.from_numpy(correlation))
    predictor.refresh()
    weight = predictor.weight.numpy()
    np.testing.assert_allclose(weight, reference_predictor(correlation, EPS), rtol=1e-10, atol=1e-12)
    # The clipped direction keeps only the boost (an exact zero eigenvalue is avoided here: the square
    # root would turn eigh's 1e-16 round-off into 1e-8).
    np.testing.assert_allclose(np.sort(np.linalg.eigvalsh(weight)), [EPS, 0.2 + EPS, 0.5 + EPS, 1 + EPS],
                               rtol=1e-10, atol=1e-12)


def test_forward_applies_the_set_weight_and_gradients_flow_to_the_input_only():
    predictor = DirectPredictor(3).double()
    predictor.observe(*random_views(0, rows=6, dim=3))
    predictor.refresh()
    f = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    out = predictor(f)
    torch.testing.assert_close(out, f @ predictor.weight.T)
    out.sum().backward()
    assert f.grad is not None
    assert list(predictor.parameters()) == []
    assert not predictor.weight.requires_grad and predictor.weight.grad is None


def test_a_non_finite_batch_leaves_the_correlation_unchanged():
    predictor = DirectPredictor(3).double()
    predictor.observe(*random_views(0, rows=4, dim=3))
    before = predictor.correlation.clone()
    poisoned = random_views(1, rows=4, dim=3)
    poisoned[1][2, 0] = float("nan")
    predictor.observe(*poisoned)
    torch.testing.assert_close(predictor.correlation, before, rtol=0, atol=0)
    assert predictor.num_observed.item() == 1


def test_correlation_and_weight_are_checkpointed():
    predictor = DirectPredictor(3)
    predictor.observe(*[v.float() for v in random_views(0, rows=6, dim=3)])
    predictor.refresh()
    restored = DirectPredictor(3)
    restored.load_state_dict(predictor.state_dict())
    for name in ("weight", "correlation", "num_observed"):
        torch.testing.assert_close(getattr(restored, name), getattr(predictor, name))


@pytest.mark.parametrize("method", [SimSiam, BYOL])
def test_no_gradient_reaches_the_predictor_and_it_has_no_optimizer_group(method):
    model = tiny_method(method, in_chans=1, predictor="direct_pred", pred_hidden_dim=None)
    model.configure_model()
    batch = next(iter(fake_loader(batch_size=8)))
    model.shared_step(batch)["loss"].backward()
    assert isinstance(model.predictor, DirectPredictor) and list(model.predictor.parameters()) == []
    assert model.predictor.weight.grad is None
    assert all(p.grad is not None for p in model.projector.parameters())  # through W_p
    grouped = {id(p) for group in model.parameter_groups() for p in group["params"]}
    assert id(model.predictor.weight) not in grouped


def test_the_eigendecomposition_runs_every_freq_steps_only(monkeypatch):
    model = tiny_method(SimSiam, in_chans=1, predictor="direct_pred", pred_hidden_dim=None, direct_pred_freq=3)
    model.configure_model()
    calls = []
    real_eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda *a, **k: calls.append(1) or real_eigh(*a, **k))
    refreshed_after = []
    for step in range(8):
        before = len(calls)
        model.on_optimizer_step(step)
        if len(calls) > before:
            refreshed_after.append(step)
    assert refreshed_after == [0, 3, 6]  # the official code: after iterations with niter % freq == 0
    assert len(calls) == 3


def _observe_shard(shards: list[list[torch.Tensor]]) -> dict:
    predictor = DirectPredictor(shards[0][0].shape[1], rho=RHO).double()
    views = shards[torch.distributed.get_rank()]
    predictor.observe(*views)
    predictor.observe(*[2 * v for v in views])  # a second step, so the EMA combines global batches
    predictor.refresh()
    return {"correlation": predictor.correlation, "weight": predictor.weight}


@pytest.mark.timeout(120)
def test_two_ranks_use_the_global_batch_statistics(tmp_path):
    # Uneven shards: the mean must weigh every row once, not every rank.
    shards = [random_views(0, rows=3, dim=4), random_views(1, rows=5, dim=4)]
    results = run_on_two_ranks(_observe_shard, tmp_path, shards)

    single = DirectPredictor(4, rho=RHO).double()
    whole = [torch.cat([shards[0][v], shards[1][v]]) for v in range(2)]
    single.observe(*whole)
    single.observe(*[2 * v for v in whole])
    single.refresh()
    for result in results:
        torch.testing.assert_close(result["correlation"], single.correlation, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(result["weight"], single.weight, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", [SimSiam, BYOL])
def test_a_non_linear_predictor_with_direct_pred_is_a_clear_error(method):
    with pytest.raises(ValueError, match=r"predictor='direct_pred'.*pred_hidden_dim=32.*non-linear"):
        method(predictor="direct_pred", pred_hidden_dim=32)
    with pytest.raises(ValueError, match=r"unknown predictor 'linear'.*mlp, direct_pred"):
        method(predictor="linear")
    with pytest.raises(ValueError, match=r"direct_pred_freq must be at least 1.*got 0"):
        method(predictor="direct_pred", direct_pred_freq=0)


@pytest.mark.parametrize("method", [SimSiam, BYOL])
def test_a_short_fit_with_direct_pred_sets_the_predictor_from_its_statistics(method):
    model = tiny_method(method, in_chans=1, num_classes=4, batch_size=8, predictor="direct_pred", pred_hidden_dim=None)
    quick_trainer(max_steps=3).fit(model, train_dataloaders=fake_loader(batch_size=8, length=64))
    predictor = model.predictor
    assert predictor.num_observed.item() == 3
    correlation = predictor.correlation.double().numpy()
    assert np.all(np.isfinite(correlation)) and np.abs(correlation).sum() > 0
    # Refreshed after the last step (freq 1), from the F of the three steps.
    np.testing.assert_allclose(predictor.weight.double().numpy(), reference_predictor(correlation, EPS),
                               rtol=1e-4, atol=1e-5)


def test_observing_and_refreshing_make_no_host_sync(tmp_path):
    model = tiny_method(SimSiam, in_chans=1, num_classes=4, batch_size=8, predictor="direct_pred", pred_hidden_dim=None)
    per_step = syncs_per_step(model, tmp_path)[1]
    syncing = {step: seen for step, seen in per_step.items() if (step + 1) % LOG_EVERY and seen}
    assert not syncing, f"host syncs outside logger steps: {syncing}"
