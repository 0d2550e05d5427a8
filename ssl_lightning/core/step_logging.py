"""Which training steps the logger writes, and what is logged on those steps only."""

from __future__ import annotations

import lightning as L
import torch

from ssl_lightning.distributed import all_reduce_sum
from ssl_lightning.metrics.accuracy import labelled_top_k_hits


def logger_writes_this_step(trainer: L.Trainer) -> bool:
    """Whether the logger writes this training step's values (Lightning's every-n-steps rule).

    Values only worth reading in the logs (learning rates, EMA momentum, training accuracy) are
    logged on those steps alone: each ``self.log`` call costs about 0.2 ms, a few percent of a small
    step, and reading a device value there is the one host sync a step may make (docs/scale.md).
    """
    if trainer.fast_dev_run:
        return True
    # log_every_n_steps=0: Lightning writes no step at all.
    return trainer.log_every_n_steps > 0 and (trainer.global_step + 1) % trainer.log_every_n_steps == 0


def log_learning_rates(module: L.LightningModule) -> None:
    """``lr/<group>`` of every parameter group, on the steps the logger writes."""
    if not logger_writes_this_step(module.trainer):
        return
    for group in module.trainer.optimizers[0].param_groups:
        module.log(f"lr/{group.get('name', 'group')}", group["lr"], batch_size=1)


def log_labelled_accuracy(
    module: L.LightningModule, logits: torch.Tensor, labels: torch.Tensor, names: dict[int, str]
) -> int:
    """Logs the global batch's top-k accuracy over its labelled rows (``names``: k -> metric name),
    each labelled image of every rank weighed once, and returns how many were labelled (nothing is
    logged when none is). Reads the device: call it on logger steps only, on every rank (it
    all-reduces)."""
    counts = all_reduce_sum(labelled_top_k_hits(logits.detach(), labels, tuple(names)))
    *hits, labelled = counts.tolist()
    if labelled > 0:
        for name, hit in zip(names.values(), hits):
            module.log(name, hit / labelled, batch_size=int(labelled))
    return int(labelled)
