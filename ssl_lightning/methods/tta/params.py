"""Which parts of a source model test-time adaptation changes: the normalisation layers' affine
parameters (Tent, EATA, SAR), and BatchNorm switched to the test batch's statistics (BN-adapt and
every method after it). The selections of the mariodoebler/test-time-adaptation benchmark."""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

#: layers whose affine parameters (``weight``, ``bias``) Tent adapts: timm's norm classes subclass these
NORMALISATION_LAYERS = (_BatchNorm, nn.LayerNorm, nn.GroupNorm)


def use_test_batch_statistics(model: nn.Module) -> int:
    """Make every BatchNorm layer normalise with the statistics of the batch it sees, in train and in
    eval mode, and never update running statistics: ``track_running_stats=False`` and the running
    buffers removed (PyTorch's BatchNorm uses batch statistics when it has none). Returns how many
    layers changed (0: the model has no BatchNorm, and BN-adapt changes nothing)."""
    layers = [module for module in model.modules() if isinstance(module, _BatchNorm)]
    for layer in layers:
        layer.track_running_stats = False
        layer.running_mean = None
        layer.running_var = None
        layer.num_batches_tracked = None
    return len(layers)


def normalisation_affine_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of the affine ``weight`` and ``bias`` of every normalisation layer
    (BatchNorm, LayerNorm, GroupNorm and their subclasses), in module order: Tent's ``collect_params``."""
    selected = []
    for module_name, module in model.named_modules():
        if isinstance(module, NORMALISATION_LAYERS):
            for name, parameter in module.named_parameters(recurse=False):
                if name in ("weight", "bias"):
                    selected.append((f"{module_name}.{name}" if module_name else name, parameter))
    return selected


def adapt_only(model: nn.Module, parameters: list[tuple[str, nn.Parameter]]) -> list[nn.Parameter]:
    """Freeze ``model`` except ``parameters``, which then require gradients; returns them."""
    model.requires_grad_(False)
    for _, parameter in parameters:
        parameter.requires_grad_(True)
    return [parameter for _, parameter in parameters]


def adapt_normalisation_affine(method) -> list[nn.Parameter]:
    """Tent's selection, shared by Tent, EATA and ROID: BatchNorm on test-batch statistics, and only the
    normalisation layers' affine parameters adapt (the rest frozen). Refuses a model without any."""
    use_test_batch_statistics(method.model)
    parameters = normalisation_affine_parameters(method.model)
    if not parameters:
        name = type(method).__name__
        raise ValueError(
            f"{name}: the source model ({method.source.describe()}) has no normalisation layer with an affine weight "
            f"and bias (BatchNorm, LayerNorm, GroupNorm), so {name} has nothing to adapt."
        )
    return adapt_only(method.model, parameters)
