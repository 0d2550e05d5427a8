import importlib.machinery
import sys
import types

import pytest
import torch

from ssl_lightning.callbacks.plots import project_2d


class RecordingUMAP:
    """Stands in for umap-learn's UMAP: records its arguments, returns the first two columns."""

    calls: list[dict] = []

    def __init__(self, **kwargs):
        RecordingUMAP.calls.append(kwargs)

    def fit_transform(self, x):
        return x[:, :2] * 10


@pytest.fixture
def fake_umap(monkeypatch):
    module = types.ModuleType("umap")
    module.__spec__ = importlib.machinery.ModuleSpec("umap", None)
    module.UMAP = RecordingUMAP
    RecordingUMAP.calls = []
    monkeypatch.setitem(sys.modules, "umap", module)
    return module


def test_auto_projection_uses_umap_when_installed(fake_umap):
    x = torch.randn(30, 5)
    coords = project_2d(x, "auto", seed=3)
    assert RecordingUMAP.calls == [{"n_components": 2, "random_state": 3}]
    torch.testing.assert_close(coords, x[:, :2] * 10)


def test_pca_projection_ignores_umap_and_keeps_the_main_directions(fake_umap):
    x = torch.zeros(200, 4)
    x[:, 2] = torch.linspace(-5, 5, 200)  # all the variance lies along one axis
    coords = project_2d(x, "pca")
    assert RecordingUMAP.calls == []
    assert coords.shape == (200, 2)
    assert coords[:, 0].abs().max() == pytest.approx(5.0, rel=1e-4)
