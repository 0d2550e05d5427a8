"""The base of distillation students: the teacher's arguments, read into a ``FrozenTeacher``."""

from __future__ import annotations

from typing import Any

from torch import nn

from ssl_lightning.components.frozen_teacher import FrozenTeacher
from ssl_lightning.methods.supervised.base import SupervisedMethod


class DistillationStudent(SupervisedMethod):
    """A supervised method taught by a frozen classifier (``self.teacher``, a
    :class:`~ssl_lightning.components.frozen_teacher.FrozenTeacher`; ``SupervisedMethod.setup("fit")``
    loads it and checks it against the data). One source: ``teacher_ckpt`` (or an exported backbone
    with ``teacher_head``), ``teacher_timm`` with ``teacher_weights``, or ``teacher`` in Python.

    ``teacher_optional``: a student that may train without any teacher (``GuidedSelfDistillation``'s
    round 0) gets ``self.teacher = None`` then; the others stop when ``fit`` finds no source.

    Args:
        teacher_ckpt: a checkpoint of a supervised method (``Classifier``, a distilled student) or of
            ``FineTune``, or an exported backbone ``.safetensors`` (with ``teacher_head``).
        teacher_head: with an exported backbone: a file with the classifier head's weight and bias.
        teacher_timm: a timm model name, with ``teacher_weights`` (a local state dict file) and
            ``teacher_timm_kwargs`` (its builder arguments).
        teacher: a teacher ``nn.Module`` (images -> logits) in Python; not saved in the
            hyperparameters (pass it again to ``load_from_checkpoint`` to resume).
        save_teacher: keep the teacher's weights in the student's checkpoints.
        **kwargs: backbone, data, optimizer and schedule arguments of :class:`SupervisedMethod`.
    """

    teacher_optional = False
    python_only_arguments = ("teacher",)

    def __init__(
        self,
        teacher_ckpt: str | None = None,
        teacher_head: str | None = None,
        teacher_timm: str | None = None,
        teacher_weights: str | None = None,
        teacher_timm_kwargs: dict[str, Any] | None = None,
        teacher: nn.Module | None = None,
        save_teacher: bool = False,
        **kwargs: Any,
    ):
        name = type(self).__name__
        has_source = teacher_ckpt is not None or teacher_timm is not None or teacher is not None
        if self.teacher_optional and not has_source:
            orphans = [arg for arg, value in (("teacher_head", teacher_head), ("teacher_weights", teacher_weights),
                                              ("teacher_timm_kwargs", teacher_timm_kwargs)) if value is not None]
            if orphans or save_teacher:
                raise ValueError(
                    f"{name}: {', '.join(orphans) or 'save_teacher'} given without a teacher. Give teacher_ckpt, "
                    "teacher_timm or teacher, or leave every teacher argument unset to train without a teacher."
                )
        super().__init__(**kwargs)
        self.teacher: FrozenTeacher | None = None
        if has_source or not self.teacher_optional:
            self.teacher = FrozenTeacher(name, teacher_ckpt, teacher_head, teacher_timm, teacher_weights,
                                         teacher_timm_kwargs, teacher, save_teacher)
