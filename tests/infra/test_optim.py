import math
from types import SimpleNamespace

import pytest
import torch
from timm.optim import AdamP, Lamb, Lars
from torch import nn

from ssl_lightning.backbones import build_backbone
from ssl_lightning.optim import (
    OPTIMIZERS,
    build_lr_scheduler,
    cosine_momentum,
    create_optimizer,
    global_batch_size,
    infinite_lr,
    param_groups,
    scale_lr,
    warmup_cosine_lr,
)


def small_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.LayerNorm(4),
        nn.Linear(4, 5),
        nn.Linear(5, 2, bias=False),
    )


# ---------------------------------------------------------------- schedules (pure functions)


def test_warmup_cosine_lr_formula():
    total, warmup, lr_max, lr_min = 110, 10, 2.0, 0.2
    assert warmup_cosine_lr(0, total, lr_max, warmup, lr_min) == pytest.approx(lr_max / warmup)
    assert warmup_cosine_lr(4, total, lr_max, warmup, lr_min) == pytest.approx(lr_max * 5 / 10)
    assert warmup_cosine_lr(9, total, lr_max, warmup, lr_min) == pytest.approx(lr_max)
    # cosine: start, middle, end
    assert warmup_cosine_lr(10, total, lr_max, warmup, lr_min) == pytest.approx(lr_max)
    middle = (lr_max + lr_min) / 2
    assert warmup_cosine_lr(60, total, lr_max, warmup, lr_min) == pytest.approx(middle)
    assert warmup_cosine_lr(35, total, lr_max, warmup, lr_min) == pytest.approx(
        lr_min + (lr_max - lr_min) * (1 + math.cos(math.pi * 25 / 100)) / 2
    )
    assert warmup_cosine_lr(110, total, lr_max, warmup, lr_min) == pytest.approx(lr_min)
    assert warmup_cosine_lr(500, total, lr_max, warmup, lr_min) == pytest.approx(lr_min)


def test_warmup_cosine_lr_without_warmup():
    assert warmup_cosine_lr(0, 100, 1.0, 0) == pytest.approx(1.0)
    assert warmup_cosine_lr(50, 100, 1.0, 0) == pytest.approx(0.5)


def test_infinite_lr_phases():
    max_steps, warmup, cooldown, anneal = 1000, 100, 200, 300
    lr_max, lr_const, lr_min = 1.0, 0.4, 0.01
    args = (max_steps, lr_max, warmup, cooldown, lr_const, anneal, lr_min)
    assert infinite_lr(0, *args) == pytest.approx(lr_max / warmup)
    assert infinite_lr(99, *args) == pytest.approx(lr_max)  # warm-up end
    assert infinite_lr(100, *args) == pytest.approx(lr_max)  # cool-down start
    assert infinite_lr(200, *args) == pytest.approx((lr_max + lr_const) / 2)  # mid cool-down
    assert infinite_lr(150, *args) == pytest.approx(
        lr_const + (lr_max - lr_const) * (1 + math.cos(math.pi * 50 / 200)) / 2
    )
    for step in (300, 500, 699):  # constant phase
        assert infinite_lr(step, *args) == pytest.approx(lr_const)
    n_a = max_steps - anneal
    assert infinite_lr(n_a, *args) == pytest.approx(lr_const)
    assert infinite_lr(850, *args) == pytest.approx(lr_const * (lr_min / lr_const) ** (150 / 300))
    assert infinite_lr(999, *args) == pytest.approx(lr_const * (lr_min / lr_const) ** (299 / 300))
    assert infinite_lr(1000, *args) == pytest.approx(lr_min)
    assert infinite_lr(5000, *args) == pytest.approx(lr_min)


def test_infinite_lr_without_annealing_stays_constant():
    assert infinite_lr(10_000, 100, 1.0, 10, 10, 0.5, 0, 0.0) == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"warmup_steps": 601}, "must not exceed max_steps"),
        ({"cooldown_steps": -1}, "cooldown_steps must be >= 0"),
        ({"lr_min": 0.0}, "0 < lr_min <= lr_const"),
        ({"lr_min": 0.5}, "0 < lr_min <= lr_const"),
    ],
)
def test_infinite_lr_rejects_bad_arguments(kwargs, message):
    args = dict(
        max_steps=1000, lr_max=1.0, warmup_steps=100, cooldown_steps=100,
        lr_const=0.3, anneal_steps=300, lr_min=0.01,
    )
    with pytest.raises(ValueError, match=message):
        infinite_lr(0, **{**args, **kwargs})


def test_cosine_momentum():
    base, final, total = 0.996, 1.0, 1000
    assert cosine_momentum(0, total, base, final) == pytest.approx(base)
    assert cosine_momentum(500, total, base, final) == pytest.approx((base + final) / 2)
    assert cosine_momentum(250, total, base, final) == pytest.approx(
        final - (final - base) * (math.cos(math.pi / 4) + 1) / 2
    )
    assert cosine_momentum(1000, total, base, final) == pytest.approx(final)
    assert cosine_momentum(0, total, 0.99) == pytest.approx(0.99)


# ---------------------------------------------------------------- LambdaLR on a real optimizer


def run_scheduler(scheduler, steps):
    """LRs of every group as seen by optimizer steps 0 .. steps-1 (Lightning's order)."""
    seen = []
    for _ in range(steps):
        seen.append([group["lr"] for group in scheduler.optimizer.param_groups])
        scheduler.optimizer.step()
        scheduler.step()
    return seen


def two_group_optimizer(peaks=(0.8, 0.05)):
    params = [nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3))]
    return torch.optim.SGD([{"params": [p], "lr": lr} for p, lr in zip(params, peaks)], lr=1.0)


def test_build_lr_scheduler_warmup_cosine_follows_each_group_peak():
    peaks, total, warmup = (0.8, 0.05), 60, 7
    scheduler = build_lr_scheduler(
        two_group_optimizer(peaks), "warmup_cosine", total, warmup, min_lr_ratio=0.1
    )
    for step, lrs in enumerate(run_scheduler(scheduler, total)):
        for lr, peak in zip(lrs, peaks):
            assert lr == pytest.approx(warmup_cosine_lr(step, total, peak, warmup, 0.1 * peak))


def test_build_lr_scheduler_keeps_a_fixed_lr_group_at_its_peak():
    optimizer = two_group_optimizer((0.8, 0.05))
    optimizer.param_groups[1]["fixed_lr"] = True  # SimSiam's predictor
    total, warmup = 30, 5
    scheduler = build_lr_scheduler(optimizer, "warmup_cosine", total, warmup)
    for step, (scheduled, fixed) in enumerate(run_scheduler(scheduler, total)):
        assert scheduled == pytest.approx(warmup_cosine_lr(step, total, 0.8, warmup, 0.0))
        assert fixed == 0.05


def test_build_lr_scheduler_infinite_follows_each_group_peak():
    peaks, total = (0.8, 0.05), 80
    scheduler = build_lr_scheduler(
        two_group_optimizer(peaks), "infinite", total, warmup_steps=5, min_lr_ratio=0.01,
        cooldown_steps=15, const_lr_ratio=0.25, anneal_steps=20,
    )
    for step, lrs in enumerate(run_scheduler(scheduler, total)):
        for lr, peak in zip(lrs, peaks):
            expected = infinite_lr(step, total, peak, 5, 15, 0.25 * peak, 20, 0.01 * peak)
            assert lr == pytest.approx(expected)


def test_build_lr_scheduler_constant_with_warmup():
    scheduler = build_lr_scheduler(two_group_optimizer((0.8, 0.05)), "constant", 20, 4)
    seen = run_scheduler(scheduler, 20)
    assert [lrs[0] for lrs in seen[:5]] == pytest.approx([0.2, 0.4, 0.6, 0.8, 0.8])
    assert seen[-1] == pytest.approx([0.8, 0.05])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"schedule": "step"}, "warmup_cosine, infinite, constant"),
        ({"anneal_steps": 10}, "only apply to schedule='infinite'"),
        ({"schedule": "constant", "min_lr_ratio": 0.1}, "min_lr_ratio does not apply"),
        ({"schedule": "infinite"}, "needs const_lr_ratio"),
        (
            {"schedule": "infinite", "const_lr_ratio": 0.5, "anneal_steps": 10},
            "0 < lr_min <= lr_const",
        ),
        ({"warmup_steps": 101}, "0 <= warmup_steps <= total_steps"),
    ],
)
def test_build_lr_scheduler_rejects_bad_arguments(kwargs, message):
    args = {"schedule": "warmup_cosine", "total_steps": 100, "warmup_steps": 10, **kwargs}
    with pytest.raises(ValueError, match=message):
        build_lr_scheduler(two_group_optimizer(), **args)


# ---------------------------------------------------------------- parameter groups


def ids(params) -> set[int]:
    return {id(p) for p in params}


def test_param_groups_split_and_skip_frozen():
    net = small_net()
    conv, bn, norm, linear, head = net[0], net[1], net[5], net[6], net[7]
    head.weight.requires_grad_(False)
    groups = param_groups(net, weight_decay=0.05)

    by_name = {group["name"]: group for group in groups}
    assert [group["name"] for group in groups] == ["weights", "no_decay"]
    assert by_name["weights"]["weight_decay"] == 0.05
    assert by_name["no_decay"]["weight_decay"] == 0.0
    assert ids(by_name["weights"]["params"]) == ids([conv.weight, linear.weight])
    assert ids(by_name["no_decay"]["params"]) == ids(
        [conv.bias, bn.weight, bn.bias, norm.weight, norm.bias, linear.bias]
    )
    trainable = [p for p in net.parameters() if p.requires_grad]
    assert sum(len(group["params"]) for group in groups) == len(trainable)


def test_param_groups_shared_parameter_appears_once_and_empty_groups_dropped():
    net = nn.Sequential(nn.Linear(3, 3, bias=False), nn.Linear(3, 3, bias=False))
    net[1].weight = net[0].weight
    groups = param_groups(net, weight_decay=0.1)
    assert [group["name"] for group in groups] == ["weights"]
    assert len(groups[0]["params"]) == 1


def test_param_groups_honour_no_weight_decay_of_a_nested_timm_vit():
    # Pre-training wraps the backbone with heads, so the ViT's own list must be found below the root.
    vit = build_backbone("vit_tiny_patch16_224", kwargs={"img_size": 16, "patch_size": 4, "depth": 1})
    student = nn.ModuleList([vit, nn.Linear(192, 8)])
    no_decay = ids(next(g for g in param_groups(student, 0.05) if g["name"] == "no_decay")["params"])
    assert {id(vit.pos_embed), id(vit.cls_token)} <= no_decay
    assert id(vit.patch_embed.proj.weight) not in no_decay


# ---------------------------------------------------------------- optimizers


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("sgd", torch.optim.SGD),
        ("adam", torch.optim.Adam),
        ("adamw", torch.optim.AdamW),
        ("lars", Lars),
        ("lamb", Lamb),
        ("adamp", AdamP),
    ],
)
def test_create_optimizer_classes_keep_group_settings(name, cls):
    assert name in OPTIMIZERS
    groups = param_groups(small_net(), weight_decay=0.05)
    probe = [nn.Parameter(torch.zeros(4))]
    groups.append({"name": "probe", "params": probe, "weight_decay": 0.0, "lr": 0.3})
    optimizer = create_optimizer(name, groups, lr=0.1, weight_decay=1e-4)
    assert type(optimizer) is cls
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.05, 0.0, 0.0]
    assert [group["lr"] for group in optimizer.param_groups] == [0.1, 0.1, 0.3]
    assert [group["name"] for group in optimizer.param_groups] == ["weights", "no_decay", "probe"]


def test_create_optimizer_sgd_is_heavy_ball_and_momentum_reaches_it():
    groups = [{"params": [nn.Parameter(torch.zeros(2))]}]
    optimizer = create_optimizer("sgd", groups, lr=0.1, weight_decay=0.0, momentum=0.8)
    assert optimizer.param_groups[0]["nesterov"] is False
    assert optimizer.param_groups[0]["momentum"] == 0.8


def test_create_optimizer_unknown_name():
    with pytest.raises(ValueError, match="sgd, adam, adamw, lars, lamb, adamp"):
        create_optimizer("adagrad", [{"params": [nn.Parameter(torch.zeros(2))]}], 0.1, 0.0)


def test_lars_adapts_only_decayed_groups():
    torch.manual_seed(0)
    weight, bias = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(4))
    groups = [
        {"name": "weights", "params": [weight], "weight_decay": 0.1},
        {"name": "no_decay", "params": [bias], "weight_decay": 0.0},
    ]
    lr, wd, momentum, eta = 0.5, 0.1, 0.9, 0.001
    optimizer = create_optimizer("lars", groups, lr=lr, weight_decay=wd, momentum=momentum)
    assert optimizer.param_groups[0]["trust_coeff"] == eta

    w, b = weight.detach().clone(), bias.detach().clone()
    buf_w = buf_b = None
    for _ in range(3):
        g_w, g_b = torch.randn(4, 3), torch.randn(4)
        weight.grad, bias.grad = g_w.clone(), g_b.clone()
        optimizer.step()
        # reference: LARS with trust ratio on the decayed group, plain SGD momentum elsewhere
        trust = eta * w.norm() / (g_w.norm() + wd * w.norm() + 1e-8)
        update_w = (g_w + wd * w) * trust
        buf_w = update_w if buf_w is None else momentum * buf_w + update_w
        buf_b = g_b if buf_b is None else momentum * buf_b + g_b
        w, b = w - lr * buf_w, b - lr * buf_b
        torch.testing.assert_close(weight.detach(), w)
        torch.testing.assert_close(bias.detach(), b)


# ---------------------------------------------------------------- LR scaling and batch size


def test_scale_lr_modes():
    assert scale_lr(0.3, 1024, "linear") == pytest.approx(1.2)
    assert scale_lr(0.3, 1024, "sqrt") == pytest.approx(0.6)
    assert scale_lr(0.3, 1024, "none") == pytest.approx(0.3)
    with pytest.raises(ValueError, match="linear, sqrt, none"):
        scale_lr(0.3, 1024, "cubic")


def test_global_batch_size_counts_processes_and_accumulation():
    trainer = SimpleNamespace(world_size=8, accumulate_grad_batches=4)
    assert global_batch_size(trainer, 32) == 32 * 8 * 4
    assert global_batch_size(SimpleNamespace(world_size=1, accumulate_grad_batches=1), 256) == 256
