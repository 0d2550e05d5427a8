"""`compile_views`: the device-side views' pixel work through torch.compile gives the eager views."""

import pytest
import torch

import ssl_lightning.datamodules.device_views as dv
from ssl_lightning.datamodules import Digits
from ssl_lightning.datamodules.views import resolve_views

from helpers.views import STD, assert_same_views, first_training_batch


def compiled_graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


@pytest.fixture
def fresh_compiler():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()


@pytest.mark.parametrize("preset", ["simclr", "byol", "dino"])
def test_the_blended_pixel_work_is_one_graph_without_breaks(preset):
    # A graph break would leave the compiled path as several kernels-launching pieces, and a data-dependent
    # shape (indexing the chosen samples) would break it: blending keeps the whole draw in one graph.
    images = torch.randint(0, 256, (8, 3, 40, 40), dtype=torch.uint8)
    mean, std = torch.full((1, 3, 1, 1), 0.5), torch.full((1, 3, 1, 1), 0.25)
    for spec in resolve_views(preset, 32, 3):
        params = dv.sample_view_params(spec.num * 8, 40, 40, spec, images.device)
        explained = torch._dynamo.explain(dv.draw_views)(images, params, spec, mean, std, True)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


@pytest.mark.slow
def test_compiled_views_equal_the_eager_views_for_the_same_draws(fresh_compiler):
    specs = resolve_views("byol", 24, 3)  # two specs; partial jitter, blur and solarize choices
    images = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    eager = dv.DeviceViews(specs, (0.5,) * 3, (STD,) * 3)
    compiled = dv.DeviceViews(specs, (0.5,) * 3, (STD,) * 3, compile=True)
    for batch in (images, images[:20]):  # a smaller last batch compiles again and still agrees
        drawn = compiled(batch, torch.Generator().manual_seed(1))
        assert len(drawn) == 2
        assert_same_views(drawn, eager(batch, torch.Generator().manual_seed(1)))
    assert compiled_graphs() == 4  # two specs x two batch sizes


@pytest.mark.slow
def test_a_datamodule_with_compile_views_trains_on_the_same_views(fresh_compiler):
    with pytest.warns(UserWarning, match="compile_views=True on the CPU"):
        _, compiled = first_training_batch(compile_views=True)
    assert compiled_graphs() == 1
    _, eager = first_training_batch()
    assert set(compiled) == set(eager) == {"views", "label", "index"}
    assert_same_views(compiled["views"], eager["views"])


def test_compile_views_needs_device_views_and_says_how_to_fix_it():
    with pytest.raises(ValueError, match="set view_device to 'device' or 'auto', or compile_views=False"):
        Digits(compile_views=True, view_device="cpu")
    with pytest.raises(ValueError, match="compile_views=True needs device-side views, but view_device='auto' chose"):
        Digits(batch_size=8, num_workers=0, compile_views=True, views="none").setup("fit")
