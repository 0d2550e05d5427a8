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
