"""MoCHi (Kalantidis et al., NeurIPS 2020, "Hard Negative Mixing for Contrastive Learning"): MoCo v2
with synthetic hard negatives mixed from each query's hardest queued keys."""

from __future__ import annotations

from torch import Tensor

from ssl_lightning.losses.mochi import mix_hard_negatives
from ssl_lightning.losses.moco import info_nce_with_queue
from ssl_lightning.methods.ssl.moco_v2 import MoCoV2


class MoCHi(MoCoV2):
    """MoCHi (N, s, s') on top of :class:`MoCoV2`, with the paper's ImageNet-100 setting
    MoCHi (1024, 1024, 256) as defaults: per query, the N = ``num_hardest`` queued keys most similar
    to it, ``num_mixed`` (s) normalised mixtures of two of them and ``num_query_mixed`` (s')
    mixtures of the query with one of them (query share below 0.5) join the query's negatives
    (:func:`~ssl_lightning.losses.mochi.mix_hard_negatives`). The mixtures carry no gradient and
    are never enqueued: the queue holds only real keys, exactly as MoCo v2's.

    Mixing starts at epoch ``mix_from_epoch``, 0 by default, as in the paper's ImageNet-100 runs;
    the paper delays it for some longer ImageNet-1K runs, where the first epochs' embeddings (and
    hence their "hardest" negatives) are still close to random.

    Every other argument and default is :class:`MoCoV2`'s (symmetric loss included: each view's
    query mixes negatives from its own key view's queue).

    Args:
        num_hardest: N, hardest queued negatives per query the mixtures draw from (<= queue_size).
        num_mixed: s, mixtures of two hard negatives per query.
        num_query_mixed: s', mixtures of the query with a hard negative per query.
        mix_from_epoch: first epoch with synthetic negatives.
        **kwargs: arguments of :class:`MoCoV2`.
    """

    def __init__(
        self,
        num_hardest: int = 1024,
        num_mixed: int = 1024,
        num_query_mixed: int = 256,
        mix_from_epoch: int = 0,
        queue_size: int = 65536,
        **kwargs,
    ):
        super().__init__(queue_size=queue_size, **kwargs)
        if not 1 <= num_hardest <= queue_size:
            raise ValueError(
                f"MoCHi needs 1 <= num_hardest <= queue_size, got num_hardest={num_hardest} and queue_size={queue_size}: "
                "the hardest negatives are drawn from the queue"
            )
        if num_mixed < 0 or num_query_mixed < 0 or mix_from_epoch < 0:
            raise ValueError(
                f"MoCHi needs num_mixed, num_query_mixed and mix_from_epoch >= 0, got {num_mixed}, {num_query_mixed}, "
                f"{mix_from_epoch}"
            )

    def contrast(self, query: Tensor, key: Tensor, negatives: Tensor) -> Tensor:
        hp = self.hparams
        if self.current_epoch < hp.mix_from_epoch:  # a Python int: no host sync
            return super().contrast(query, key, negatives)
        synthetic = mix_hard_negatives(query, negatives, hp.num_hardest, hp.num_mixed, hp.num_query_mixed)
        return info_nce_with_queue(query, key, negatives, hp.temperature, extra_negatives=synthetic)
