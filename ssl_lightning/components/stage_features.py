"""The feature maps after a backbone's stages, caught during its ordinary forward pass.

USKD's weak auxiliary head and LSSKD's per-stage auxiliary classifiers read intermediate features.
A forward hook on each stage's module catches its output while the backbone runs once as usual,
so the pooled features the method trains on and the stage maps come from the same pass, and the
backbone keeps its own ``__call__`` (compiled, FSDP-wrapped or plain).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

#: torchvision ResNets' stages (timm models name theirs in ``feature_info``)
TORCHVISION_RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")

#: timm's ``feature_info`` entries of a stem, not a stage (ResNets list ``act1``; ConvNeXts, ViTs none)
STEM_MODULES = ("act1", "stem", "conv1", "bn1")


def stage_module_names(backbone: nn.Module) -> list[str]:
    """The modules whose outputs are the backbone's stage feature maps, shallowest first: timm's
    ``feature_info`` (the stem's entry left out), or a torchvision ResNet's ``layer1..layer4``."""
    info = getattr(backbone, "feature_info", None)
    if info:
        return [entry["module"] for entry in info if entry["module"] not in STEM_MODULES]
    modules = dict(backbone.named_modules())
    if all(name in modules for name in TORCHVISION_RESNET_STAGES):
        return list(TORCHVISION_RESNET_STAGES)
    raise ValueError(
        f"{type(backbone).__name__} declares no stages: intermediate features need a timm model (its "
        "feature_info names them) or a torchvision ResNet. Use such a backbone, or give the stage module "
        "names explicitly."
    )


def pooled(stage_map: Tensor) -> Tensor:
    """``[B, C]`` from a stage's output: the mean over the positions of a CNN's ``[B, C, H, W]`` map, over
    the tokens of a transformer block's ``[B, N, C]`` (global average pooling)."""
    if stage_map.dim() == 4:
        return stage_map.mean(dim=(2, 3))
    if stage_map.dim() == 3:
        return stage_map.mean(dim=1)
    raise ValueError(f"A stage output to pool must be [B, C, H, W] or [B, tokens, C], got {tuple(stage_map.shape)}; "
                     "choose another stage.")


class _Catcher:
    """A forward hook that keeps its module's output while its owner is running a tap. A class, not a
    closure: a method holding taps pickles (``ddp_spawn``) and deep-copies (a copy's hooks write into
    the copy's store, which ``deepcopy`` copies once for the tap and its hooks together)."""

    def __init__(self, store: dict, name: str):
        self.store, self.name = store, name

    def __call__(self, module: nn.Module, args, output: Tensor) -> None:
        if self.store["armed"]:  # ordinary forwards (validation, export) keep nothing
            self.store["maps"][self.name] = output


class StageFeatures:
    """Catches the outputs of ``backbone``'s stage modules during its forward pass.

    ``tap(images)`` runs the backbone once and returns its features and the caught maps, in the
    order of ``stages`` (indices into :func:`stage_module_names`, negative from the last; or module
    names). The maps keep their graph, so losses on them train the backbone below them. Outside a
    tap the hooks keep nothing.

    Args:
        backbone: the feature extractor (``[B, C, H, W] -> [B, D]``).
        stages: which stages to catch.
    """

    def __init__(self, backbone: nn.Module, stages: Sequence[int | str], owner: str = "StageFeatures"):
        available = stage_module_names(backbone)
        wrong = [stage for stage in stages if isinstance(stage, int) and not -len(available) <= stage < len(available)]
        if wrong:
            raise ValueError(f"{owner}: stages {wrong} do not exist; the backbone has {len(available)} stages "
                             f"{available} (indices 0 to {len(available) - 1}, or negative from the last).")
        self.names = [available[stage] if isinstance(stage, int) else stage for stage in stages]
        modules = dict(backbone.named_modules())
        missing = [name for name in self.names if name not in modules]
        if missing:
            raise ValueError(f"{type(backbone).__name__} has no module {missing[0]!r}; its stages are {available}.")
        self.backbone = backbone
        self._store: dict = {"armed": False, "maps": {}}
        for name in dict.fromkeys(self.names):
            modules[name].register_forward_hook(_Catcher(self._store, name))

    def __call__(self, images: Tensor) -> tuple[Tensor, list[Tensor]]:
        self._store["armed"] = True
        try:
            feats = self.backbone(images)
            maps = [self._store["maps"][name] for name in self.names]
        finally:
            self._store["armed"] = False
            self._store["maps"].clear()  # holds no graph between steps
        return feats, maps

    @torch.no_grad()
    def channels(self, in_chans: int, image_size: int) -> list[int]:
        """Each caught map's width once :func:`pooled` (the channels of a ``[B, C, H, W]`` map, the width of
        a transformer's ``[B, N, C]`` tokens): timm's ``feature_info`` ``num_chs`` where it names every
        stage, else one forward pass on a dummy batch in eval mode."""
        declared = {entry["module"]: entry["num_chs"] for entry in getattr(self.backbone, "feature_info", None) or []}
        if all(name in declared for name in self.names):
            return [declared[name] for name in self.names]
        was_training = self.backbone.training
        self.backbone.eval()
        try:
            _, maps = self(torch.zeros(2, in_chans, image_size, image_size))
        finally:
            self.backbone.train(was_training)
        return [pooled(m).shape[1] for m in maps]
