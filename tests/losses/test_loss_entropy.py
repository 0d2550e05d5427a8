"""softmax_entropy (Tent's objective) against the definition written out in float64."""

import math

import pytest
import torch

from ssl_lightning.losses.entropy import softmax_entropy


def reference_entropy(logits):
    rows = []
    for row in logits.tolist():
        top = max(row)
        normaliser = sum(math.exp(value - top) for value in row)
        probabilities = [math.exp(value - top) / normaliser for value in row]
        rows.append(-sum(p * math.log(p) for p in probabilities if p > 0))
    return torch.tensor(rows, dtype=torch.float64)


def test_value_and_gradient_match_the_definition():
    logits = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    torch.testing.assert_close(softmax_entropy(logits).double(), reference_entropy(logits), rtol=1e-6, atol=1e-6)
    # dH/dz_k = -p_k (log p_k + H) for the entropy H of p = softmax(z)
    given = logits.clone().float().requires_grad_(True)
    softmax_entropy(given).sum().backward()
    p = torch.softmax(logits, dim=1)
    expected = -p * (torch.log(p) + reference_entropy(logits)[:, None])
    torch.testing.assert_close(given.grad.double(), expected, rtol=1e-5, atol=1e-6)


def test_uniform_is_log_c_and_saturated_is_zero_without_nan():
    assert softmax_entropy(torch.zeros(2, 10)).tolist() == pytest.approx([math.log(10)] * 2, rel=1e-6)
    saturated = torch.tensor([[1e4, 0.0, -1e4]], requires_grad=True)
    value = softmax_entropy(saturated)
    value.sum().backward()
    assert value.item() == 0.0 and torch.isfinite(saturated.grad).all()


def test_bad_shape_is_refused():
    with pytest.raises(ValueError, match=r"softmax_entropy expects logits of shape \[N, C\], got \(4,\)"):
        softmax_entropy(torch.zeros(4))
