"""Sharpness-aware minimisation (Foret et al., "Sharpness-Aware Minimization for Efficiently Improving
Generalization", ICLR 2021) around a base optimizer, for SAR: davda54/sam's two-step form, as the
mariodoebler/test-time-adaptation benchmark copies it into ``classification/methods/sar.py``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

#: added to the gradient norm so that a zero gradient gives a zero perturbation (davda54/sam)
NORM_EPS = 1e-12


class SAM:
    """Two steps per update, with the gradients of two backward passes:

    1. :meth:`first_step`, after a backward pass at ``theta``: move to
       ``theta + rho * g / (||g|| + 1e-12)`` (``g`` all the parameters' gradients, ``||g||`` their joint L2
       norm), the first-order worst point within distance ``rho``; the gradients are cleared.
    2. :meth:`second_step`, after a backward pass at that point: go back to ``theta`` and let the base
       optimizer step with the gradient taken at the perturbed point; the gradients are cleared.

    It keeps no state across updates (the base optimizer keeps its own), so resetting the base
    optimizer resets SAM. Under several processes, average the gradients (``TTAMethod.average_gradients``)
    after each backward pass so that every process perturbs and steps alike.

    Args:
        parameters: the parameters the base optimizer updates.
        base_optimizer: the optimizer of the actual step (SAR: SGD with momentum).
        rho: the neighbourhood radius (0.05 in SAR and davda54/sam's default).
    """

    def __init__(self, parameters: list[nn.Parameter], base_optimizer: torch.optim.Optimizer, rho: float = 0.05):
        if rho < 0:
            raise ValueError(f"SAM: rho is the neighbourhood radius and must be >= 0, got {rho}")
        self.parameters = list(parameters)
        self.base_optimizer = base_optimizer
        self.rho = rho
        self._origin: list[Tensor] | None = None

    @torch.no_grad()
    def first_step(self) -> None:
        grads = [p.grad for p in self.parameters if p.grad is not None]
        self._origin = [p.detach().clone() for p in self.parameters]
        if grads:
            # at least float32: half-precision squares of small gradients underflow
            dtype = torch.promote_types(grads[0].dtype, torch.float32)
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dtype=dtype) for g in grads]))
            scale = self.rho / (norm + NORM_EPS)
            for p in self.parameters:
                if p.grad is not None:
                    p.add_(p.grad * scale.to(p.dtype))
        self.base_optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def second_step(self) -> None:
        if self._origin is None:
            raise RuntimeError("SAM.second_step() needs a first_step() before it (the point to return to)")
        for p, origin in zip(self.parameters, self._origin):
            p.copy_(origin)
        self._origin = None
        self.base_optimizer.step()
        self.base_optimizer.zero_grad(set_to_none=True)
