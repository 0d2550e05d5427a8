"""Optimizers by name, parameter groups (layer-wise LR decay included), learning-rate scaling and
LR / momentum schedules.

The schedule functions are pure: they map an optimizer step (0-indexed) to an absolute value, so
they can be tested and plotted alone. `build_lr_scheduler` turns them into a `LambdaLR` that is
stepped once per optimizer step (Lightning `interval: "step"`).
"""

import math
from collections.abc import Iterator
from fnmatch import fnmatch

import torch
import torchvision
from timm.models._manipulate import group_with_matcher
from timm.optim import create_optimizer_v2
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

OPTIMIZERS = ("sgd", "adam", "adamw", "lars", "lamb", "adamp")
LR_SCALINGS = ("linear", "sqrt", "none")
LR_SCHEDULES = ("warmup_cosine", "infinite", "constant")

# Normalisation layers whose parameters are never decayed. `_NormBase` covers BatchNorm,
# SyncBatchNorm and InstanceNorm; 1-D parameters are caught separately (biases, timm's RmsNorm).
_NORM_LAYERS = (_NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm, nn.RMSNorm)


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Split the trainable parameters of `module` into a decayed and a non-decayed group.

    `"no_decay"` holds biases, every parameter of a normalisation layer, any other parameter
    with at most one dimension, and the parameters a submodule lists in timm's
    `no_weight_decay()` (a ViT's pos_embed and cls_token); `"weights"` holds the rest. Frozen parameters are left out, a
    parameter shared by several modules appears once, and empty groups are dropped. With LARS and
    LAMB the `"no_decay"` group is also excluded from the layer-wise adaptation (see
    `create_optimizer`).
    """
    weights, no_decay = [], []
    for _, param, decays in _trainable(module):
        (weights if decays else no_decay).append(param)
    groups = [
        {"name": "weights", "params": weights, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]


def _trainable(module: nn.Module) -> Iterator[tuple[str, nn.Parameter, bool]]:
    """Each trainable parameter of `module` once (a shared one too): its name, itself, and whether
    weight decay applies to it (see `param_groups`)."""
    no_decay_patterns = [
        f"{prefix}.{pattern}" if prefix else pattern
        for prefix, layer in module.named_modules() if hasattr(layer, "no_weight_decay")
        for pattern in layer.no_weight_decay()
    ]
    seen = set()
    for prefix, layer in module.named_modules():
        for name, param in layer.named_parameters(recurse=False):
            if param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                full_name = f"{prefix}.{name}" if prefix else name
                decays = not (isinstance(layer, _NORM_LAYERS) or param.ndim <= 1) and not any(
                    fnmatch(full_name, pattern) for pattern in no_decay_patterns
                )
                yield full_name, param, decays


# torchvision's ResNets have no `group_matcher`, but their parameter names are timm's ResNet ones.
_RESNET_STAGES = {"stem": r"^conv1|^bn1", "blocks": r"^layer(\d+)"}
_HEAD = "<head>."  # matched by no backbone's matcher, so the head lands in timm's top group


def layer_ids(backbone: nn.Module, head: nn.Module) -> dict[str, int]:
    """Layer id of every parameter of `backbone` + `head` (head names get the prefix `<head>.`).

    The layers are timm's coarse parameter groups (`backbone.group_matcher(coarse=True)`), the ones
    timm's own layer decay uses: 0 = stem / embeddings (a ViT's patch_embed, cls_token, pos_embed),
    then one id per ViT block or ResNet / ConvNeXt / Swin stage. As in timm's grouping of a whole
    classifier, the head and anything the matcher leaves unmatched (a ViT's `fc_norm`) share the top
    id; a ViT's final `norm` joins the last block (MAE and BEiT put it with the head instead).
    """
    if hasattr(backbone, "group_matcher"):
        matcher = backbone.group_matcher(coarse=True)
    elif isinstance(backbone, torchvision.models.ResNet):
        matcher = _RESNET_STAGES
    else:
        raise ValueError(
            f"layer_decay needs to know the backbone's layers: {type(backbone).__name__} has no timm "
            "group_matcher() and is not a torchvision ResNet. Use a timm backbone or set layer_decay to None."
        )
    names = [(name, None) for name, *_ in _trainable(backbone)]
    names += [(_HEAD + name, None) for name, *_ in _trainable(head)]
    # timm exports group_parameters(module, ...), which needs one module holding both; this is the
    # function it calls, which takes (name, value) pairs.
    return group_with_matcher(names, matcher, reverse=True)


def layer_decay_param_groups(
    backbone: nn.Module, head: nn.Module, weight_decay: float, layer_decay: float | None
) -> list[dict]:
    """Parameter groups for fine-tuning `backbone` + `head`, each with an `"lr_scale"`.

    Layer-wise LR decay (ELECTRA, Clark et al. 2020; BEiT, Bao et al. 2022; MAE, He et al. 2022): a
    parameter of layer `i` (see `layer_ids`; the head is the top layer `L`) gets
    `lr_scale = layer_decay ** (L - i)`, so the head trains at the full LR and the stem at
    `layer_decay ** L` of it. Groups are named
    `"layer<i>"` and `"layer<i>_no_decay"`. With `layer_decay` None or 1.0 every scale is 1 and
    the groups are `"weights"` and `"no_decay"`, as from `param_groups`. The caller sets each
    group's `"lr"` to `lr * lr_scale`; `build_lr_scheduler` then follows each group's own peak.

    No weight decay: `param_groups`' rule (biases, normalisation parameters, other <= 1-D
    parameters, the names listed in timm's `no_weight_decay()`, such as a ViT's pos_embed and
    cls_token), as in timm's, MAE's and BEiT's fine-tuning.
    """
    if layer_decay is not None and not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1] or None, got {layer_decay}.")
    decay_off = layer_decay is None or layer_decay == 1.0
    entries = list(_trainable(backbone))
    entries += [(_HEAD + name, param, decays) for name, param, decays in _trainable(head)]
    ids = dict.fromkeys((name for name, *_ in entries), 0) if decay_off else layer_ids(backbone, head)
    top = max(ids.values())
    groups: dict[tuple[int, bool], dict] = {}
    for name, param, decays in entries:
        layer = ids[name]
        if (layer, decays) not in groups:
            if decay_off:
                group_name = "weights" if decays else "no_decay"
            else:
                group_name = f"layer{layer}" if decays else f"layer{layer}_no_decay"
            groups[layer, decays] = {
                "name": group_name, "params": [], "weight_decay": weight_decay if decays else 0.0,
                "lr_scale": 1.0 if decay_off else layer_decay ** (top - layer),
            }
        groups[layer, decays]["params"].append(param)
    return [groups[key] for key in sorted(groups, key=lambda key: (key[0], not key[1]))]


def create_optimizer(
    name: str,
    param_groups: list[dict],
    lr: float,
    weight_decay: float,
    momentum: float = 0.9,
    **kwargs,
) -> torch.optim.Optimizer:
    """Build an optimizer from `OPTIMIZERS` with timm's `create_optimizer_v2`.

    `lr` and `weight_decay` are defaults: a group's own `"lr"` / `"weight_decay"` keys win, so the
    groups from `param_groups` (and a probe group with its own LR) keep their settings. `momentum`
    only reaches the optimizers that take one (sgd, lars); `kwargs` go to the optimizer class
    (e.g. `betas`, `eps`, `trust_coeff`, `nesterov`).

    - "sgd": `torch.optim.SGD`. timm turns Nesterov on by default; the SSL recipes (MoCo, SimSiam,
      SwAV) use plain heavy-ball momentum, so we pass `nesterov=False` unless told otherwise.
    - "adam", "adamw": torch's classes; "adamp": timm's `AdamP`; "lamb": timm's `Lamb` (note its
      default `max_grad_norm=1.0` clips the global gradient norm inside the optimizer).
    - "lars": timm's `Lars`, trust ratio
      `trust_coeff * ||w|| / (||g|| + weight_decay * ||w|| + eps)` (You et al. 2017) multiplies
      `g + weight_decay * w` before SGD momentum, and only in groups whose `weight_decay != 0`
      (unless `always_adapt=True`). SimCLR and BYOL exclude biases and normalisation parameters
      from both decay and adaptation; the `"no_decay"` group (weight decay 0) gets exactly that
      here, as does a probe group with weight decay 0. `trust_coeff` defaults to 0.001, the
      papers' eta. Two small differences from SimCLR's TensorFlow LARS remain: its denominator is
      `||g + weight_decay * w||` (at most timm's), and its momentum accumulates `lr * update`
      rather than `update`, which only differs while the LR changes.
    """
    opt = name.lower()
    if opt not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {name!r}; valid names are {', '.join(OPTIMIZERS)}.")
    if opt == "sgd":
        kwargs.setdefault("nesterov", False)
    return create_optimizer_v2(
        param_groups,
        opt=opt,
        lr=lr,
        weight_decay=weight_decay,
        momentum=momentum,
        filter_bias_and_bn=False,
        **kwargs,
    )


def scale_lr(lr_per_256: float, global_batch_size: int, scaling: str) -> float:
    """Scale a learning rate given per 256 images to the global batch size.

    "linear": `lr * B / 256` (Goyal et al. 2017; SimCLR's 0.3 x B / 256, BYOL's 0.2 x B / 256);
    "sqrt": `lr * sqrt(B / 256)` (SimCLR's 0.075 x sqrt(B) for small batches, i.e. 1.2 per 256);
    "none": `lr` as given.
    """
    if scaling not in LR_SCALINGS:
        raise ValueError(f"Unknown scaling {scaling!r}; valid values are {', '.join(LR_SCALINGS)}.")
    if global_batch_size <= 0:
        raise ValueError(f"global_batch_size must be positive, got {global_batch_size}.")
    if scaling == "linear":
        return lr_per_256 * global_batch_size / 256
    if scaling == "sqrt":
        return lr_per_256 * math.sqrt(global_batch_size / 256)
    return lr_per_256


def global_batch_size(trainer, per_process_batch_size: int) -> int:
    """Images per optimizer step: batch x processes (devices x nodes) x accumulated batches."""
    return per_process_batch_size * trainer.world_size * trainer.accumulate_grad_batches


def _check_warmup(total_steps: int, warmup_steps: int) -> None:
    if total_steps <= 0 or not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"Need total_steps > 0 and 0 <= warmup_steps <= total_steps, "
            f"got total_steps={total_steps}, warmup_steps={warmup_steps}."
        )


def _warmup(step: int, warmup_steps: int, lr_max: float) -> float:
    # Counting from step + 1 means the first step already trains (LR lr_max / warmup_steps)
    # and the last warm-up step reaches lr_max.
    return lr_max * (step + 1) / warmup_steps


def _half_cosine(progress: float, start: float, end: float) -> float:
    return end + (start - end) * (1 + math.cos(math.pi * progress)) / 2


def warmup_cosine_lr(
    step: int, total_steps: int, lr_max: float, warmup_steps: int, lr_min: float = 0.0
) -> float:
    """LR at optimizer step `step` (0-indexed) of linear warm-up then half-cosine decay.

    Warm-up: `lr_max * (step + 1) / warmup_steps` for `step < warmup_steps`, so step 0 already
    trains and step `warmup_steps - 1` reaches `lr_max`. Then, with
    `t = (step - warmup_steps) / (total_steps - warmup_steps)`,
    `lr_min + (lr_max - lr_min) * (1 + cos(pi * t)) / 2`: `lr_max` at `warmup_steps` and `lr_min`
    from `total_steps` on.
    """
    _check_warmup(total_steps, warmup_steps)
    if step < warmup_steps:
        return _warmup(step, warmup_steps, lr_max)
    if step >= total_steps:
        return lr_min
    return _half_cosine((step - warmup_steps) / (total_steps - warmup_steps), lr_max, lr_min)


def _check_infinite(max_steps, warmup_steps, cooldown_steps, anneal_steps, lr_const, lr_min):
    phases = {
        "warmup_steps": warmup_steps,
        "cooldown_steps": cooldown_steps,
        "anneal_steps": anneal_steps,
    }
    for arg, value in phases.items():
        if value < 0:
            raise ValueError(f"{arg} must be >= 0, got {value}.")
    if sum(phases.values()) > max_steps:
        raise ValueError(
            f"warmup_steps + cooldown_steps + anneal_steps ({warmup_steps} + {cooldown_steps} + "
            f"{anneal_steps}) must not exceed max_steps ({max_steps})."
        )
    if anneal_steps > 0 and not 0 < lr_min <= lr_const:
        raise ValueError(
            f"The exponential annealing needs 0 < lr_min <= lr_const, "
            f"got lr_min={lr_min}, lr_const={lr_const}."
        )


def infinite_lr(
    step: int,
    max_steps: int,
    lr_max: float,
    warmup_steps: int,
    cooldown_steps: int,
    lr_const: float,
    anneal_steps: int,
    lr_min: float,
) -> float:
    """LR at optimizer step `step` (0-indexed) of the infinite schedule.

    From Ibrahim et al. 2024, "Simple and Scalable Strategies to Continually Pre-train Large
    Language Models"; Singh et al. 2025, "Beyond Cosine Decay", use it for continual SSL.

    Four phases: linear warm-up to `lr_max` as in `warmup_cosine_lr`; half-cosine from `lr_max`
    to `lr_const` over `cooldown_steps`; `lr_const` until `n_a = max_steps - anneal_steps`; then
    exponential annealing `lr_const * (lr_min / lr_const) ** ((step - n_a) / anneal_steps)`,
    which reaches `lr_min` at `max_steps` and stays there. The constant phase can be resumed or
    extended without knowing the final budget; only the annealing needs it (as in the
    constant-plus-cooldown schedules of Hägele et al. 2024, "Scaling Laws and Compute-Optimal
    Training Beyond Fixed Training Durations"). With `anneal_steps=0` the LR stays at `lr_const`.
    """
    _check_infinite(max_steps, warmup_steps, cooldown_steps, anneal_steps, lr_const, lr_min)
    anneal_start = max_steps - anneal_steps
    if step < warmup_steps:
        return _warmup(step, warmup_steps, lr_max)
    if step < warmup_steps + cooldown_steps:
        return _half_cosine((step - warmup_steps) / cooldown_steps, lr_max, lr_const)
    if step < anneal_start or anneal_steps == 0:
        return lr_const
    progress = min(step - anneal_start, anneal_steps) / anneal_steps
    return lr_const * (lr_min / lr_const) ** progress


def cosine_momentum(
    step: int, total_steps: int, base_momentum: float, final_momentum: float = 1.0
) -> float:
    """BYOL's EMA momentum: `final - (final - base) * (cos(pi * k / K) + 1) / 2`.

    `base_momentum` at k = 0, `final_momentum` at k = K and after.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}.")
    return _half_cosine(min(step, total_steps) / total_steps, base_momentum, final_momentum)


def cosine_weight_decay(step: int, total_steps: int, start: float, end: float) -> float:
    """DINO's weight-decay schedule (Caron et al. 2021; its ``cosine_scheduler`` without warm-up):
    `end + (start - end) * (1 + cos(pi * k / K)) / 2`, `start` at k = 0, `end` at k = K and after.

    A function of the optimizer step alone, so a resumed run continues it exactly.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}.")
    return _half_cosine(min(step, total_steps) / total_steps, start, end)


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    schedule: str,
    total_steps: int,
    warmup_steps: int,
    min_lr_ratio: float = 0.0,
    cooldown_steps: int = 0,
    const_lr_ratio: float | None = None,
    anneal_steps: int = 0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step `LambdaLR` giving every param group the same schedule shape.

    Each group's peak is its own initial `"lr"` (so a probe group keeps its own LR), and
    `min_lr_ratio` / `const_lr_ratio` are fractions of that peak: a group with peak `p` ends at
    `p * min_lr_ratio`. Absolute floors would not work for groups with different peaks. A group
    with `"fixed_lr": True` stays at its peak throughout (no warm-up, no decay).

    - "warmup_cosine": `warmup_cosine_lr`; uses `warmup_steps`, `min_lr_ratio`.
    - "infinite": `infinite_lr` with `max_steps = total_steps`; also needs `cooldown_steps`,
      `const_lr_ratio`, `anneal_steps`, and `min_lr_ratio > 0` when `anneal_steps > 0`.
    - "constant": linear warm-up, then the peak.

    Step it once per optimizer step (Lightning `"interval": "step"`).
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(
            f"Unknown schedule {schedule!r}; valid values are {', '.join(LR_SCHEDULES)}."
        )
    if schedule != "infinite" and (cooldown_steps or anneal_steps or const_lr_ratio is not None):
        raise ValueError(
            f"cooldown_steps, const_lr_ratio and anneal_steps only apply to schedule='infinite', "
            f"got schedule={schedule!r}."
        )
    if schedule == "constant" and min_lr_ratio:
        raise ValueError("min_lr_ratio does not apply to schedule='constant'.")
    if schedule == "infinite" and const_lr_ratio is None:
        raise ValueError(
            "schedule='infinite' needs const_lr_ratio (a fraction of each group's peak LR)."
        )
    _check_warmup(total_steps, warmup_steps)

    # The schedules are homogeneous in their LR arguments, so evaluating them with a peak of 1
    # and the ratios gives the factor LambdaLR applies to each group's own peak.
    def shape(step: int) -> float:
        if schedule == "warmup_cosine":
            return warmup_cosine_lr(step, total_steps, 1.0, warmup_steps, min_lr_ratio)
        if schedule == "infinite":
            return infinite_lr(
                step, total_steps, 1.0, warmup_steps,
                cooldown_steps, const_lr_ratio, anneal_steps, min_lr_ratio,
            )
        return _warmup(step, warmup_steps, 1.0) if step < warmup_steps else 1.0

    # A group marked "fixed_lr" keeps its peak from the first step to the last (SimSiam's
    # predictor); the others follow the shape. LambdaLR evaluates step 0 when it is built, so the
    # infinite schedule's checks run here too.
    shapes = [_fixed if group.get("fixed_lr") else shape for group in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, shapes)


def _fixed(step: int) -> float:
    return 1.0
