"""Top-k hits over the labelled rows of a batch, by masking (no host sync)."""

from __future__ import annotations

import torch


def labelled_top_k_hits(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1,)) -> torch.Tensor:
    """``[hits@k for k in ks] + [labelled]``: how many rows labelled >= 0 have their label among the
    k largest logits, and how many rows are labelled, as one float tensor (sum it over ranks, then
    divide). A k above the number of classes counts as the number of classes.

    Rows labelled -1 are masked rather than selected away, so the shapes never depend on the data
    and nothing is read on the host.
    """
    labelled = labels >= 0
    k_max = min(max(ks), logits.shape[1])
    ranked = logits.topk(k_max, dim=1).indices
    correct = (ranked == labels[:, None]) & labelled[:, None]
    hits = [correct[:, : min(k, k_max)].any(1).sum() for k in ks]
    return torch.stack([*hits, labelled.sum()]).float()
