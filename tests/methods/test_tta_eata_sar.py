"""EATA, SAR and SAM: each step against a plain float64 reference (filters, weights, Fisher regulariser,
SAM's perturbation and restore, the base optimizer's step), the Fisher information against a plain
estimate, SAR's collapse reset, SAR's parameter selection, runs on a corruption stream changing only
what each method adapts, two processes against one, and the refusals of bad hyperparameters."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssl_lightning.methods.tta.eata import EATA
from ssl_lightning.methods.tta.params import normalisation_affine_parameters, use_test_batch_statistics
from ssl_lightning.methods.tta.sam import SAM
from ssl_lightning.methods.tta.sar import SAR, sar_parameters

from helpers.gloo import run_on_two_ranks
from helpers.tta import RecordSteps, run_tta, tiny_source

NORM_PARAMETERS = {"backbone.1.weight", "backbone.1.bias"}  # tiny_source's BatchNorm / GroupNorm


def confident_source(norm="batch"):
    """tiny_source with a sharper head, so entropies spread on both sides of the margins used here."""
    model = tiny_source(norm)
    with torch.no_grad():
        model.head.weight.mul_(4)
    return model


def stream_batches(count=2, seed=0):
    """Images whose per-image channel offsets survive BatchNorm, so predictions differ between images."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(10, 3, 16, 16, generator=generator) + 3 * torch.randn(10, 3, 1, 1, generator=generator)
            for _ in range(count)]


def prepared(method):
    """The method as ``trainer.test`` prepares it, without a Trainer (and so without source data)."""
    method.setup("test")
    method.on_test_start()
    return method


def reference_model(source):
    model = copy.deepcopy(source).double()
    use_test_batch_statistics(model)
    model.eval()
    return model, [p for _, p in normalisation_affine_parameters(model)]


def entropy_of(logits):
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


def params_of(method):
    return [p.detach().clone() for p in method.adapted]


# ----------------------------------------------------------------------------------------------- EATA


def reference_eata(source, batches, margin_e0, d_margin, lr, alpha=0.0, fisher=None, anchors=None):
    """EATA with SGD (no momentum), written plainly: per batch, the logits before the step, the parameters
    after it, and which samples were selected."""
    model, params = reference_model(source)
    margin = margin_e0 * math.log(3)
    average, history = None, []
    for images in batches:
        logits = model(images.double())
        entropy, probs = entropy_of(logits), logits.softmax(1).detach()
        selected = []
        for i in range(len(images)):
            keep = float(entropy[i].detach()) < margin
            if keep and average is not None:
                cosine = float((average * probs[i]).sum() / average.norm() / probs[i].norm())
                keep = abs(cosine) < d_margin
            selected.append(keep)
        kept = [i for i in range(len(images)) if selected[i]]
        loss = sum(entropy[i] / math.exp(float(entropy[i].detach()) - margin) for i in kept) / max(len(kept), 1)
        if alpha:
            loss = loss + alpha * sum((f.double() * (p - a.double()) ** 2).sum() for p, f, a in zip(params, fisher, anchors))
        if kept:
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p.sub_(lr * g)
            mean = probs[kept].mean(0)
            average = mean if average is None else 0.9 * average + (1 - 0.9) * mean
        history.append((logits.detach(), [p.detach().clone() for p in params], selected))
    return history, average


def test_eata_steps_equal_the_plain_reference_with_both_filters_and_the_regulariser():
    source, batches = confident_source(), stream_batches()
    args = {"margin_e0": 0.9, "d_margin": 0.95, "lr": 0.5}
    method = EATA(source=copy.deepcopy(source), num_classes=3, fisher_alpha=3.0, optimizer="sgd", momentum=0.0,
                  margin_e0=args["margin_e0"], d_margin=args["d_margin"], lr=args["lr"])
    method.setup("test")
    generator = torch.Generator().manual_seed(5)
    method.fisher = [torch.rand(p.shape, generator=generator) for p in method.adapted]
    method.anchors = [p.detach() + 0.1 * torch.randn(p.shape, generator=generator) for p in method.adapted]
    method.on_test_start()  # a Fisher information is given: no source data read
    history, average = reference_eata(source, batches, **args, alpha=3.0, fisher=method.fisher, anchors=method.anchors)
    for images, (logits, params, selected) in zip(batches, history):
        torch.testing.assert_close(method.forward_and_adapt(images).double(), logits, rtol=1e-5, atol=1e-5)
        for actual, expected in zip(params_of(method), params):
            torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-5)
    first, second = history[0][2], history[1][2]
    assert 0 < sum(first) < 10 and 0 < sum(second) < 10  # both filters dropped some samples ...
    entropy = entropy_of(reference_model(source)[0](batches[1].double()))
    assert any(e < 0.9 * math.log(3) and not s for e, s in zip(entropy, second))  # ... the redundancy one too
    torch.testing.assert_close(method.average_probs.double(), average, rtol=1e-5, atol=1e-6)
    assert method.has_average_probs


def test_eata_takes_no_step_when_nothing_passes_the_filters():
    method = prepared(EATA(source=confident_source(), num_classes=3, fisher_alpha=0.0, margin_e0=0.01))
    before = params_of(method)
    method.forward_and_adapt(stream_batches(1)[0])
    assert all(torch.equal(a, b) for a, b in zip(params_of(method), before))
    assert not method.tta_optimizer.state  # Adam never stepped (a zero-gradient step would still move it)
    assert not method.has_average_probs


def test_fisher_information_equals_a_plain_estimate_on_the_source_images(tmp_path):
    source = tiny_source()
    method = EATA(source=copy.deepcopy(source), fisher_alpha=2.0, fisher_batch_size=7, margin_e0=1.0, d_margin=1.0)
    run_tta(method, tmp_path)
    model, params = reference_model(source)
    sums, batches = [torch.zeros_like(p) for p in params], 0
    for batch in method.source_batches(2000, 7, seed=0):  # the 24 training images: batches of 7, 7, 7, 3
        logits = model(batch["views"][0].double())
        loss = F.cross_entropy(logits, logits.argmax(1))  # the model's own predictions as labels
        for total, grad in zip(sums, torch.autograd.grad(loss, params)):
            total += grad**2
        batches += 1
    assert batches == 4
    for actual, expected in zip(method.fisher, sums):
        torch.testing.assert_close(actual.double(), expected / batches, rtol=1e-4, atol=1e-9)
        assert expected.abs().sum() > 0
    for anchor, (_, p) in zip(method.anchors, normalisation_affine_parameters(source)):
        assert torch.equal(anchor, p.detach())  # theta0: the source values


def test_eata_on_a_stream_changes_only_the_norm_parameters_and_reset_restores_the_average(tmp_path):
    source = tiny_source()
    method = EATA(source=copy.deepcopy(source), margin_e0=1.0, d_margin=1.0)
    run_tta(method, tmp_path)
    original = dict(source.named_parameters())
    for name, parameter in method.model.named_parameters():
        assert torch.equal(parameter, original[name]) != (name in NORM_PARAMETERS), name
    assert method.has_average_probs and method.average_probs.sum() == pytest.approx(1.0, abs=1e-5)
    assert method.fisher is not None
    method.reset()
    assert not method.has_average_probs and torch.equal(method.average_probs, torch.zeros(3))
    for name, parameter in method.model.named_parameters():
        assert torch.equal(parameter, original[name]), name


def test_eta_is_eata_without_the_regulariser(tmp_path):
    method = EATA(source=tiny_source(), fisher_alpha=0.0, margin_e0=1.0, d_margin=1.0)
    run_tta(method, tmp_path)
    assert method.fisher is None and method.anchors is None


# ----------------------------------------------------------------------------------------------- SAM


def quadratic(params, a, b):
    return sum(((a @ p - b) ** 2).sum() for p in params)


def test_sam_steps_equal_the_plain_reference():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 3, generator=generator, dtype=torch.float64), torch.randn(3, generator=generator,
                                                                                    dtype=torch.float64)
    start = [torch.randn(3, generator=generator, dtype=torch.float64) for _ in range(2)]
    params = [nn.Parameter(p.clone()) for p in start]
    sam = SAM(params, torch.optim.SGD(params, lr=0.1, momentum=0.9), rho=0.05)
    theta, buffers = [p.clone() for p in start], None
    for _ in range(3):
        quadratic(params, a, b).backward()
        sam.first_step()
        assert all(p.grad is None for p in params)
        quadratic(params, a, b).backward()
        sam.second_step()
        # the reference: perturb along the joint gradient, take the gradient there, restore, SGD with momentum
        leaves = [t.clone().requires_grad_(True) for t in theta]
        g = torch.autograd.grad(quadratic(leaves, a, b), leaves)
        norm = math.sqrt(sum(float((x**2).sum()) for x in g))
        perturbed = [(t + 0.05 * x / (norm + 1e-12)).requires_grad_(True) for t, x in zip(theta, g)]
        g2 = torch.autograd.grad(quadratic(perturbed, a, b), perturbed)
        buffers = list(g2) if buffers is None else [0.9 * m + x for m, x in zip(buffers, g2)]
        theta = [t - 0.1 * m for t, m in zip(theta, buffers)]
        for p, t in zip(params, theta):
            torch.testing.assert_close(p.detach(), t, rtol=1e-12, atol=1e-14)


def test_sam_does_not_move_on_a_zero_gradient_and_refuses_misuse():
    params = [nn.Parameter(torch.ones(2))]
    sam = SAM(params, torch.optim.SGD(params, lr=0.1))
    params[0].grad = torch.zeros(2)
    sam.first_step()
    assert torch.equal(params[0].detach(), torch.ones(2))
    with pytest.raises(RuntimeError, match="first_step"):
        SAM(params, torch.optim.SGD(params, lr=0.1)).second_step()
    with pytest.raises(ValueError, match="rho"):
        SAM(params, torch.optim.SGD(params, lr=0.1), rho=-0.1)


# ----------------------------------------------------------------------------------------------- SAR


def reference_sar(source, batches, margin_e0, lr, momentum=0.9, rho=0.05):
    """SAR with SGD + momentum inside SAM, written plainly: per batch, the logits, the parameters after
    the step, and the moving average of the second loss."""
    model, params = reference_model(source)
    margin = margin_e0 * math.log(3)
    buffers, ema, history = None, None, []
    for images in batches:
        logits = model(images.double())
        entropy = entropy_of(logits)
        reliable = [float(e) < margin for e in entropy.detach()]
        loss = sum(entropy[i] for i in range(10) if reliable[i]) / max(sum(reliable), 1) + 0 * logits.sum()
        g = torch.autograd.grad(loss, params)
        norm = math.sqrt(sum(float((x**2).sum()) for x in g))
        origin = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, x in zip(params, g):
                p.add_(rho * x / (norm + 1e-12))
        entropy = entropy_of(model(images.double()))
        both = [r and float(e) < margin for r, e in zip(reliable, entropy.detach())]
        loss = sum(entropy[i] for i in range(10) if both[i]) / max(sum(both), 1) + 0 * entropy.sum()
        g2 = torch.autograd.grad(loss, params)
        buffers = list(g2) if buffers is None else [momentum * m + x for m, x in zip(buffers, g2)]
        with torch.no_grad():
            for p, o, m in zip(params, origin, buffers):
                p.copy_(o - lr * m)
        if any(both):
            ema = float(loss.detach()) if ema is None else 0.9 * ema + 0.1 * float(loss.detach())
        history.append((logits.detach(), [p.detach().clone() for p in params], ema, (sum(reliable), sum(both))))
    return history


def test_sar_steps_equal_the_plain_reference():
    source, batches = confident_source(), stream_batches()
    method = prepared(SAR(source=copy.deepcopy(source), num_classes=3, margin_e0=0.9, lr=0.5, reset_constant=0.0))
    history = reference_sar(source, batches, margin_e0=0.9, lr=0.5)
    for images, (logits, params, ema, counts) in zip(batches, history):
        torch.testing.assert_close(method.forward_and_adapt(images).double(), logits, rtol=1e-5, atol=1e-5)
        for actual, expected in zip(params_of(method), params):
            torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-5)
        assert method.has_loss_ema and method.loss_ema.item() == pytest.approx(ema, rel=1e-5)
        assert 0 < counts[1] < 10  # the filter dropped some samples
    assert method.tta_optimizer.defaults["momentum"] == 0.9 and not method.tta_optimizer.defaults["nesterov"]


@pytest.mark.parametrize("ema_before,resets", [(0.0, True), (1.0, False)])
def test_sar_resets_exactly_when_the_loss_average_falls_below_the_constant(ema_before, resets):
    method = prepared(SAR(source=confident_source(), num_classes=3, margin_e0=1.0, reset_constant=0.5))
    source_state = {key: value.clone() for key, value in method.state_dict().items()}
    method.loss_ema.fill_(ema_before)  # a crafted history: 0.9 x ema_before + 0.1 x a loss of ~0.8
    method.has_loss_ema.fill_(True)
    calls = []
    reset = method.reset
    method.reset = lambda: (calls.append(True), reset())
    method.forward_and_adapt(stream_batches(1)[0])
    assert bool(calls) == resets
    state = method.state_dict()
    if resets:  # the source state, the moving average included, and a fresh optimizer
        assert all(torch.equal(state[key], value) for key, value in source_state.items())
        assert not method.tta_optimizer.state and not method.has_loss_ema
    else:
        assert 0.5 < method.loss_ema < 1.1
        assert not torch.equal(state["model.backbone.1.weight"], source_state["model.backbone.1.weight"])


def test_sar_on_a_stream_changes_only_the_norm_parameters(tmp_path):
    source = tiny_source()
    method = SAR(source=copy.deepcopy(source), margin_e0=1.0)  # entropies ~1 stay above reset_constant 0.2
    run_tta(method, tmp_path)
    original = dict(source.named_parameters())
    for name, parameter in method.model.named_parameters():
        assert torch.equal(parameter, original[name]) != (name in NORM_PARAMETERS), name
    assert method.has_loss_ema


def test_sar_collapse_check_on_a_stream_restores_the_source_state_after_every_batch(tmp_path):
    # every entropy (< ln 3) is below reset_constant 2: the average is below it after each batch
    method = SAR(source=tiny_source(), margin_e0=1.0, reset_constant=2.0)
    record = RecordSteps()
    run_tta(method, tmp_path, callbacks=[record])
    assert len(record.before) == 8
    for state in record.before[1:] + [method.state_dict()]:
        assert state.keys() == record.before[0].keys()
        assert all(torch.equal(state[key], record.before[0][key]) for key in state)


def nested(names):
    """A model with a LayerNorm at each dotted module path."""
    root = nn.Module()
    for path in names:
        parent = root
        *parents, leaf = path.split(".")
        for part in parents:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, nn.LayerNorm(2))
    return root


def test_sar_parameters_skip_the_benchmarks_layers():
    kept = ["layer3.0.bn1", "blocks.8.norm1", "blocks.1.norm2", "fc_norm", "backbone.blocks.0.norm1"]
    skipped = ["layer4.0.bn1", "blocks.9.norm1", "blocks.10.norm2", "blocks.11.norm1", "norm", "backbone.norm",
               "backbone.layer4.1.bn2", "head.norm.inner"]
    names = {name for name, _ in sar_parameters(nested(kept + skipped))}
    assert names == {f"{path}.{p}" for path in kept for p in ("weight", "bias")}


# ----------------------------------------------------------------------------------------------- several processes


def _run(method_name, shards, fisher_seed):
    method_class = {"EATA": EATA, "SAR": SAR}[method_name]
    kwargs = {"margin_e0": 0.9, "lr": 0.5}
    if method_name == "EATA":
        kwargs.update(d_margin=0.97, fisher_alpha=2.0, optimizer="sgd", momentum=0.0)
    method = method_class(source=confident_source("group"), num_classes=3, **kwargs)
    method.setup("test")
    if method_name == "EATA":
        generator = torch.Generator().manual_seed(fisher_seed)
        method.fisher = [torch.rand(p.shape, generator=generator) for p in method.adapted]
        method.anchors = [p.detach() + 0.1 * torch.randn(p.shape, generator=generator) for p in method.adapted]
    method.on_test_start()
    logits = [method.forward_and_adapt(images).detach() for images in shards]
    buffers = {key: value.clone() for key, value in method.named_buffers()}
    return {"params": params_of(method), "logits": logits, "buffers": buffers}


def _two_rank_worker(batches):
    import torch.distributed as dist

    rank = dist.get_rank()
    shards = [images[:3] if rank == 0 else images[3:] for images in batches]  # uneven: 3 and 7 images
    return {name: _run(name, shards, fisher_seed=1) for name in ("EATA", "SAR")}


@pytest.mark.timeout(120)
def test_two_processes_adapt_like_one_on_the_whole_batch(tmp_path):
    # GroupNorm: an image's logits do not depend on the rest of its batch, so the shards' logits are the
    # whole batch's rows, and the filters, losses, averages and steps must match one process's exactly
    batches = stream_batches(3, seed=2)
    results = run_on_two_ranks(_two_rank_worker, tmp_path, batches)
    for name in ("EATA", "SAR"):
        single = _run(name, batches, fisher_seed=1)
        for rank, result in enumerate(results):
            ours = result[name]
            for actual, expected in zip(ours["params"], single["params"]):
                torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
            for key, value in single["buffers"].items():
                torch.testing.assert_close(ours["buffers"][key], value, rtol=1e-5, atol=1e-6)
            part = slice(0, 3) if rank == 0 else slice(3, 10)
            for actual, expected in zip(ours["logits"], single["logits"]):
                torch.testing.assert_close(actual, expected[part], rtol=1e-5, atol=1e-5)
        source = [p for _, p in normalisation_affine_parameters(confident_source("group"))]
        assert not all(torch.equal(p, q) for p, q in zip(single["params"], source))  # it adapted


# ----------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs,match", [
    ({"margin_e0": 0.0}, "margin_e0"), ({"margin_e0": 1.5}, "margin_e0"), ({"d_margin": 0.0}, "d_margin"),
    ({"d_margin": 1.2}, "d_margin"), ({"fisher_alpha": -1.0}, "fisher_alpha"), ({"num_samples": 0}, "num_samples"),
    ({"fisher_batch_size": 0}, "fisher_batch_size"), ({"lr": -1.0}, "lr"),
])
def test_eata_refuses_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EATA(source=tiny_source(), **kwargs)


@pytest.mark.parametrize("kwargs,match", [
    ({"margin_e0": -0.4}, "margin_e0"), ({"rho": -0.05}, "rho"), ({"reset_constant": -1.0}, "reset_constant"),
    ({"optimizer": "lion"}, "optimizer"),
])
def test_sar_refuses_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SAR(source=tiny_source(), **kwargs)


def test_models_without_adaptable_norm_layers_are_refused():
    with pytest.raises(ValueError, match="nothing to adapt"):
        prepared(EATA(source=tiny_source(norm="none"), num_classes=3))
    only_deep = nn.Sequential()
    only_deep.add_module("layer4", nn.Sequential(nn.Flatten(), nn.LayerNorm(768), nn.Linear(768, 3)))
    with pytest.raises(ValueError, match="layer4"):
        prepared(SAR(source=only_deep, num_classes=3))
    no_classifier = nn.Sequential(nn.Flatten(), nn.LayerNorm(768))
    with pytest.raises(ValueError, match="number of classes"):
        prepared(SAR(source=no_classifier))  # no num_classes, no DataModule, no linear layer to read it from
