"""The teacher of teacher-student methods (BYOL, DINO, ...), owned by composition."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ssl_lightning.optim import cosine_momentum


class EMATeacher(nn.Module):
    """A copy of a student module that follows it by an exponential moving average.

    ``teacher <- m * teacher + (1 - m) * student`` for every floating-point parameter and buffer
    (BatchNorm running statistics included); integer buffers (``num_batches_tracked``) are copied.
    ``m`` rises from ``base_momentum`` to ``final_momentum`` on BYOL's cosine schedule
    ``m_k = 1 - (1 - m0) (cos(pi k / K) + 1) / 2``. The owner calls :meth:`update` once per
    optimizer step (not per micro-batch under gradient accumulation).

    ``frozen=True`` never updates: a teacher frozen at the student's random initialisation
    (Random Teachers), or, after :meth:`load_teacher_state`, one frozen from a checkpoint
    (knowledge distillation, the source model of test-time adaptation).

    The teacher is a registered submodule, so it is saved and restored with the owner's
    checkpoint; its parameters never require gradients.
    """

    def __init__(self, student: nn.Module, base_momentum: float = 0.996, final_momentum: float = 1.0, frozen: bool = False):
        super().__init__()
        if not 0.0 <= base_momentum <= final_momentum <= 1.0:
            raise ValueError(
                f"Need 0 <= base_momentum <= final_momentum <= 1; got {base_momentum} and {final_momentum}."
            )
        self.module = copy.deepcopy(student)
        self.module.requires_grad_(False)
        self.base_momentum = base_momentum
        self.final_momentum = final_momentum
        self.frozen = frozen

    def momentum(self, step: int, total_steps: int) -> float:
        return cosine_momentum(step, total_steps, self.base_momentum, self.final_momentum)

    @torch.no_grad()
    def update(self, student: nn.Module, momentum: float) -> None:
        """One EMA step towards ``student`` (same architecture as at construction)."""
        if self.frozen:
            return
        pairs = list(_zip_strict(self.module.parameters(), student.parameters()))
        pairs += _zip_strict(self.module.buffers(), student.buffers())
        floating = [(t, s) for t, s in pairs if t.is_floating_point()]
        # One multi-tensor kernel per device and dtype instead of a launch per tensor (about 130 for a
        # ResNet-18 and its heads), as torch.optim.swa_utils' EMA does; the same values as lerp_ each.
        torch._foreach_lerp_([t for t, _ in floating], [s for _, s in floating], 1.0 - momentum)
        for t, s in pairs:
            if not t.is_floating_point():
                t.copy_(s)

    def forward(self, *args, **kwargs):
        """Teacher outputs without gradients. BatchNorm layers normalise with the batch's own
        statistics (as BYOL's target network does) and leave the running statistics, which
        follow the student by EMA, untouched."""
        with torch.no_grad(), _batch_statistics_only(self.module):
            return self.module(*args, **kwargs)

    def load_teacher_state(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load the teacher's weights (keys of the wrapped module), e.g. from a trained checkpoint."""
        self.module.load_state_dict(state_dict, strict=True)


@contextmanager
def _batch_statistics_only(module: nn.Module):
    # BatchNorm uses batch statistics when training, and only updates running statistics when
    # track_running_stats is set; turning the flag off for the call gives the first without the second.
    norms = [m for m in module.modules() if isinstance(m, _BatchNorm)]
    saved = [(m.training, m.track_running_stats) for m in norms]
    for m in norms:
        m.train(True)
        m.track_running_stats = False
    try:
        yield
    finally:
        for m, (training, tracking) in zip(norms, saved):
            m.train(training)
            m.track_running_stats = tracking


def _zip_strict(teacher: Iterator[torch.Tensor], student: Iterator[torch.Tensor]):
    teacher, student = list(teacher), list(student)
    if len(teacher) != len(student):
        raise ValueError(
            f"Teacher and student differ in structure ({len(teacher)} vs {len(student)} tensors); "
            "pass the same module layout the teacher was copied from."
        )
    return zip(teacher, student)
