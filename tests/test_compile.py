"""``compile=True``: the same losses, gradients and parameter names as an eager run."""

import pytest
import torch

from fakes import fake_loader, tiny_method
from ssl_lightning.methods import METHODS


def tiny(method, **kwargs):
    model = tiny_method(method, in_chans=1, num_classes=4, batch_size=8, **kwargs)
    model.configure_model()
    return model


def gradients(model) -> dict[str, torch.Tensor]:
    return {name: param.grad for name, param in model.named_parameters() if param.grad is not None}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_backbone_and_heads_compile_in_place_under_the_eager_names(method):
    compiled = tiny(method, compile=True)  # nothing runs, so nothing is compiled yet: fast
    # nn.Module.compile keeps the module (no OptimizedModule wrapper), so checkpoints are interchangeable.
    assert list(compiled.state_dict()) == list(tiny(method).state_dict())
    is_compiled = {name: module._compiled_call_impl is not None for name, module in compiled.named_children()}
    # Everything but the online probe and its metric: backbone, heads, teacher.
    not_compiled = {"probe", "val_probe_top1"}
    assert {"backbone", "projector"} <= set(is_compiled)
    assert is_compiled == {name: name not in not_compiled for name in is_compiled}


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_compiled_step_matches_eager_loss_and_gradients(method):
    torch.manual_seed(0)
    eager = tiny(method)
    compiled = tiny(method, compile=True)
    compiled.load_state_dict(eager.state_dict())
    batch = next(iter(fake_loader(size=16)))

    losses = {}
    for name, model in (("eager", eager), ("compiled", compiled)):
        losses[name] = model.shared_step(batch)["loss"]
        losses[name].backward()
    torch.testing.assert_close(losses["compiled"], losses["eager"], atol=1e-4, rtol=1e-4)
    eager_grads, compiled_grads = gradients(eager), gradients(compiled)
    assert compiled_grads.keys() == eager_grads.keys() and "backbone.conv1.weight" in eager_grads
    torch.testing.assert_close(compiled_grads, eager_grads, atol=1e-4, rtol=1e-4)

    if hasattr(eager, "teacher"):  # the compiled teacher reads the weights the EMA update wrote in place
        for model in (eager, compiled):
            model.teacher.update(model._online_network(), momentum=0.5)
        view = batch["views"][0]
        torch.testing.assert_close(compiled.teacher(view), eager.teacher(view), atol=1e-4, rtol=1e-4)
