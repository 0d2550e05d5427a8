"""Input checks the losses share."""

from __future__ import annotations

from torch import Tensor


def check_paired_rows(loss: str, a: Tensor, b: Tensor, names: tuple[str, str] = ("z1", "z2")) -> None:
    """``a`` and ``b`` must be two ``[N, D]`` matrices of the same shape, row i of one paired with row i
    of the other (two views' embeddings, prediction and target)."""
    if a.dim() != 2 or a.shape != b.shape:
        raise ValueError(
            f"{loss} expects {names[0]} and {names[1]} of the same 2-D shape [N, D], "
            f"got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def check_distillation_inputs(loss: str, student_logits: Tensor, teacher_logits: Tensor, temperature: float,
                              labels: Tensor | None = None) -> None:
    """Student and teacher logits ``[N, C]`` of the same shape, a positive temperature and, for the
    losses that need the target class, integer ``labels`` of shape ``[N]`` (-1: unlabelled)."""
    check_paired_rows(loss, student_logits, teacher_logits, ("student_logits", "teacher_logits"))
    if labels is not None and (labels.shape != student_logits.shape[:1] or labels.is_floating_point()):
        raise ValueError(
            f"{loss} expects labels as an integer tensor of shape [N] = {tuple(student_logits.shape[:1])} "
            f"(-1: unlabelled), got {labels.dtype} of shape {tuple(labels.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"{loss} needs temperature > 0, got {temperature}")
