"""``compile=True``: the same losses, gradients and parameter names as an eager run."""

import lightning as L
import pytest
import torch
from torchmetrics import Metric

from ssl_lightning.components import EMATeacher, OnlineProbe

from helpers.fakes import fake_loader, tiny_method
from helpers.registry import costly_paths, every_method, first_head


def tiny(method, **kwargs):
    model = tiny_method(method, in_chans=1, num_classes=4, batch_size=8, **kwargs)
    model.configure_model()
    return model


def gradients(model) -> dict[str, torch.Tensor]:
    return {name: param.grad for name, param in model.named_parameters() if param.grad is not None}


@pytest.mark.parametrize("method", every_method())
def test_backbone_and_heads_compile_in_place_under_the_eager_names(method):
    compiled = tiny(method, compile=True)  # nothing runs, so nothing is compiled yet: fast
    # nn.Module.compile keeps the module (no OptimizedModule wrapper), so checkpoints are interchangeable.
    assert list(compiled.state_dict()) == list(tiny(method).state_dict())
    is_compiled = {name: module._compiled_call_impl is not None for name, module in compiled.named_children()}
    # Everything but the online probe and the torchmetrics objects: backbone, heads, teacher.
    stays_eager = {name for name, module in compiled.named_children() if isinstance(module, (OnlineProbe, Metric))}
    head_name = next(name for name, module in compiled.named_children() if module is first_head(compiled))
    assert {"backbone", head_name} <= set(is_compiled) - stays_eager
    assert is_compiled == {name: name not in stays_eager for name in is_compiled}


@pytest.mark.slow
@pytest.mark.parametrize("method", costly_paths())
def test_compiled_step_matches_eager_loss_and_gradients(method):
    torch.manual_seed(0)
    eager = tiny(method)
    compiled = tiny(method, compile=True)
    compiled.load_state_dict(eager.state_dict())
    batch = next(iter(fake_loader(size=16)))

    losses = {}
    for name, model in (("eager", eager), ("compiled", compiled)):
        torch.manual_seed(1)  # the same random draws in both steps (MAE's and iBOT's masks)
        losses[name] = model.shared_step(batch)["loss"]
        losses[name].backward()
    torch.testing.assert_close(losses["compiled"], losses["eager"], atol=1e-4, rtol=1e-4)
    eager_grads, compiled_grads = gradients(eager), gradients(compiled)
    first_backbone_weight = next(name for name, _ in eager.named_parameters() if name.startswith("backbone."))
    assert compiled_grads.keys() == eager_grads.keys() and first_backbone_weight in eager_grads  # the backbone trains
    torch.testing.assert_close(compiled_grads, eager_grads, atol=1e-4, rtol=1e-4)

    if isinstance(getattr(eager, "teacher", None), EMATeacher):  # the compiled teacher reads the weights the EMA update wrote in place
        for model in (eager, compiled):
            model.teacher.update(model._online_network(), momentum=0.5)
        view = batch["views"][0]
        torch.testing.assert_close(compiled.teacher(view), eager.teacher(view), atol=1e-4, rtol=1e-4)


class FinalWeights(L.Callback):
    """Rank 0's weights at the end of fit, to a file (ddp_spawn returns nothing else)."""

    def __init__(self, path):
        self.path = path

    def on_train_end(self, trainer, pl_module):
        if trainer.global_rank == 0:
            torch.save({key: value.detach().clone() for key, value in pl_module.state_dict().items()}, self.path)


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.timeout(300)
def test_compiled_fit_under_ddp_ends_with_the_eager_weights(tmp_path, monkeypatch):
    # SimCLR gathers the global batch in its loss; the loss stays eager, the modules are compiled.
    # The spawned processes compile in-process: inductor's pool of compile workers once aborted a
    # process as it exited ("terminate called without an active exception"), after its fit had ended.
    monkeypatch.setenv("TORCHINDUCTOR_COMPILE_THREADS", "1")
    weights = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model = tiny("SimCLR", optimizer="sgd", lr=0.5, compile=compiled)
        initial = model.backbone.conv1.weight.detach().clone()
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=3, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            callbacks=[FinalWeights(tmp_path / f"{compiled}.pt")])
        trainer.fit(model, fake_loader(batch_size=8, length=64, size=16))
        weights[compiled] = torch.load(tmp_path / f"{compiled}.pt", weights_only=True)
    assert weights[True].keys() == weights[False].keys()
    torch.testing.assert_close(weights[True], weights[False], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(weights[True]["backbone.conv1.weight"], initial, atol=1e-4)  # it trained
