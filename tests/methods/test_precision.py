"""``precision="bf16-mixed"`` on the CPU: bfloat16 heads under autocast, float32 losses and weights."""

import pytest
import torch

from helpers.registry import every_method


@pytest.mark.parametrize("name", every_method())
def test_bf16_mixed_fit_keeps_float32_losses_and_weights(name, short_fit):
    fit = short_fit(name)  # 6 steps under bf16-mixed autocast (helpers/short_fit.py)
    assert torch.isfinite(fit.final_loss)
    assert set(fit.head_dtypes) == {torch.bfloat16}
    # The losses compute in float32 under autocast (see ssl_lightning/losses); the probe's
    # cross-entropy is float32 under autocast too.
    assert fit.loss_dtypes == [torch.float32] * 6
    assert {p.dtype for p in fit.model.parameters()} == {torch.float32}
