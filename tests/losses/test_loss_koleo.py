"""KoLeo against DINOv2's ``KoLeoLoss`` written out in NumPy (value) and as a plain float64 torch loop
(gradient); its invariance to the embeddings' scale; two rows; identical rows; and the errors. KoLeo is
per rank (DINOv2 searches the nearest neighbour in the local batch, no collective), so there is no
two-rank test: the function runs no collective."""

import numpy as np
import pytest
import torch

from ssl_lightning.losses.koleo import koleo_loss

EPS = 1e-8


def numpy_koleo(embeddings: np.ndarray, eps: float = EPS) -> float:
    """DINOv2's ``KoLeoLoss.forward`` row by row: normalise, nearest other row by inner product,
    ``-mean log(||x_i - x_nn + eps|| + eps)``."""
    x = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), eps)
    total = 0.0
    for i in range(len(x)):
        others = [j for j in range(len(x)) if j != i]
        nearest = max(others, key=lambda j: float(x[i] @ x[j]))
        total += np.log(np.linalg.norm(x[i] - x[nearest] + eps) + eps)
    return -total / len(x)


def torch_reference(embeddings: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """The same loop in float64 torch, for the gradient (the neighbours are chosen without one)."""
    rows = [row / torch.clamp(row.norm(), min=eps) for row in embeddings]
    total = 0.0
    for i, row in enumerate(rows):
        with torch.no_grad():
            nearest = max((j for j in range(len(rows)) if j != i), key=lambda j: float(row @ rows[j]))
        total = total + torch.log(torch.sqrt(((row - rows[nearest] + eps) ** 2).sum()) + eps)
    return -total / len(rows)


def random_embeddings(num_rows, dim, seed=0):
    return torch.randn(num_rows, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("num_rows, dim", [(2, 3), (5, 4), (16, 8), (32, 2)])
def test_value_matches_the_numpy_reference(num_rows, dim):
    embeddings = random_embeddings(num_rows, dim, seed=num_rows)
    expected = numpy_koleo(embeddings.numpy())
    assert koleo_loss(embeddings).item() == pytest.approx(expected, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("num_rows, dim", [(2, 3), (6, 5), (12, 4)])
def test_gradient_matches_the_float64_reference(num_rows, dim):
    embeddings = random_embeddings(num_rows, dim, seed=10 + num_rows).requires_grad_(True)
    (grad,) = torch.autograd.grad(koleo_loss(embeddings), embeddings)
    (expected,) = torch.autograd.grad(torch_reference(embeddings), embeddings)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)
    # spreading: a small step against the gradient lowers the loss
    with torch.no_grad():
        assert koleo_loss(embeddings - 1e-3 * grad) < koleo_loss(embeddings)


def test_the_scale_of_the_embeddings_does_not_matter_and_two_rows_are_each_others_neighbour():
    embeddings = random_embeddings(7, 5, seed=3)
    scales = torch.linspace(0.1, 10.0, 7, dtype=torch.float64).unsqueeze(1)
    torch.testing.assert_close(koleo_loss(embeddings * scales), koleo_loss(embeddings), rtol=1e-12, atol=1e-12)
    pair = random_embeddings(2, 4, seed=4)
    x = pair / pair.norm(dim=1, keepdim=True)
    expected = -0.5 * (torch.log((x[0] - x[1] + EPS).norm() + EPS) + torch.log((x[1] - x[0] + EPS).norm() + EPS))
    torch.testing.assert_close(koleo_loss(pair), expected, rtol=1e-12, atol=1e-12)


def test_identical_rows_give_a_large_finite_loss_and_spread_rows_a_small_one():
    same = torch.ones(4, 3, dtype=torch.float64)
    loss = koleo_loss(same)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(numpy_koleo(same.numpy()), rel=1e-9)
    assert loss.item() > 15  # -log(~eps)
    antipodal = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)  # each row's only neighbour
    assert koleo_loss(antipodal).item() == pytest.approx(-np.log(2.0 + EPS), rel=1e-6)


def test_float32_under_bf16_autocast():
    embeddings = random_embeddings(8, 6, seed=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = koleo_loss(embeddings.bfloat16())
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(koleo_loss(embeddings).item(), rel=0.05)


@pytest.mark.parametrize("shape", [(1, 4), (4,), (2, 3, 4)])
def test_fewer_than_two_rows_or_not_a_matrix_is_refused(shape):
    with pytest.raises(ValueError, match=r"koleo_loss expects embeddings \[N, D\] with N >= 2"):
        koleo_loss(torch.randn(shape))
