"""DirectPred (Tian, Chen and Ganguli, ICML 2021, "Understanding Self-supervised Learning Dynamics
without Contrastive Pairs"): a linear predictor set from the correlation of its inputs, never trained."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_lightning.distributed import all_reduce_sum

#: the predictors a method with a ``predictor`` argument offers: its MLP, or DirectPred's linear one
PREDICTORS = ("mlp", "direct_pred")


class DirectPredictor(nn.Module):
    """A bias-free linear predictor ``p = W_p f`` whose weight is set from the statistics of its
    inputs (the paper's eqs. 18-19), following the official code (facebookresearch/luckmatters,
    ``ssl/real-dataset/byol_trainer.py``: ``predictor_reg=corr``, ``balance_type=boost_scale``,
    ``dyn_convert=2``, ``dyn_zero_mean=false``, ``dyn_lambda=0.3``, ``dyn_eps=0.01``,
    ``predictor_freq=1``):

        F      <- rho F + (1 - rho) mean_i f_i f_i^T     (:meth:`observe`; the first batch sets F)
        F       = U diag(s) U^T                          (eigendecomposition, F symmetric)
        p_j     = max(sqrt(max(s_j, 0) / max_k s_k) + eps, 1e-4)
        W_p     = U diag(p) U^T                          (:meth:`refresh`)

    The mean runs over the online embeddings of both views of the global batch (all ranks), as the
    official code averages ``f f^T`` over the concatenation of the two views. ``W_p`` and ``F`` are
    buffers: checkpoints carry them, the optimizer never sees them, and no gradient reaches them
    (gradients still flow through ``W_p`` to the embeddings).

    Who calls what: the method calls :meth:`observe` with each training step's embeddings, and
    :meth:`refresh` after every ``freq``-th optimizer step (the official code sets ``W_p`` after the
    optimizer step of iterations 0, freq, 2 freq, ...; until the first refresh ``W_p`` keeps
    ``nn.Linear``'s initialisation, as the official predictor does). ``observe`` is pure tensor work
    (no host sync); it folds in every micro-batch (with gradient accumulation, each is one EMA step)
    and skips a batch with non-finite embeddings. ``refresh`` runs one ``torch.linalg.eigh`` whose
    results stay on the device.

    Departures from the official code: ``eigh`` instead of the removed ``torch.eig`` (F is
    symmetric, so they agree up to the eigenvectors' signs, which cancel in ``U diag(p) U^T``), in
    float32 like the official code; the largest eigenvalue is floored at 1e-12 so an all-zero F
    gives ``W_p = eps I`` rather than NaN; with ``freq > 1`` the official predictor is also trained
    between refreshes, here it is not (the paper's DirectPred sets it, never trains it).

    Args:
        dim: the embedding width (input and output).
        rho: EMA weight of the past correlation (the official ``dyn_lambda``; paper's rho = 0.3).
        eps: boost added to every normalised eigenvalue (the official ``dyn_eps``; paper's eps = 0.01).
    """

    #: the official code clamps the boosted eigenvalues at this floor
    MIN_EIGENVALUE = 1e-4

    def __init__(self, dim: int, rho: float = 0.3, eps: float = 0.01):
        super().__init__()
        if not 0.0 <= rho < 1.0:
            raise ValueError(f"DirectPredictor needs 0 <= rho < 1 (the EMA weight of the past correlation); got rho={rho}.")
        if eps < 0:
            raise ValueError(f"DirectPredictor needs eps >= 0 (the boost of small eigenvalues); got eps={eps}.")
        self.dim, self.rho, self.eps = dim, rho, eps
        self.register_buffer("weight", nn.Linear(dim, dim, bias=False).weight.detach().clone())
        self.register_buffer("correlation", torch.zeros(dim, dim))
        # The first observed batch sets F outright (the official Accumulator); the EMA starts after it.
        self.register_buffer("num_observed", torch.zeros((), dtype=torch.long))

    def forward(self, f: Tensor) -> Tensor:
        return F.linear(f, self.weight.to(f.dtype))

    @torch.no_grad()
    def observe(self, *embeddings: Tensor) -> None:
        """Fold the global batch's ``mean f f^T`` over ``embeddings`` (each ``[N, dim]``: one per view)
        into the EMA ``F``."""
        for f in embeddings:
            if f.dim() != 2 or f.shape[1] != self.dim:
                raise ValueError(f"DirectPredictor({self.dim}) observes [N, {self.dim}] embeddings; got {tuple(f.shape)}.")
        dtype = torch.promote_types(self.correlation.dtype, torch.float32)
        with torch.autocast(embeddings[0].device.type, enabled=False):
            f = torch.cat([e.detach().to(dtype) for e in embeddings])
            # One reduction carries the sum of f f^T and the row count, so uneven shards average right.
            packed = torch.cat([(f.T @ f).flatten(), f.new_tensor([f.shape[0]])])
            packed = all_reduce_sum(packed)
            batch_correlation = packed[:-1].view(self.dim, self.dim) / packed[-1]
            blended = self.rho * self.correlation.to(dtype) + (1 - self.rho) * batch_correlation
            updated = torch.where(self.num_observed > 0, blended, batch_correlation)
            # A non-finite batch (a step that on_nonfinite_loss="skip" drops) must not poison F for good.
            finite = torch.isfinite(batch_correlation).all()
            self.correlation.copy_(torch.where(finite, updated, self.correlation.to(dtype)))
            self.num_observed.add_(finite.long())

    @torch.no_grad()
    def refresh(self) -> None:
        """Set ``W_p = U diag(p) U^T`` from the current ``F`` (eqs. 18-19; see the class docstring)."""
        # float32 at least: eigh has no half-precision kernels (a model cast to bf16 holds a bf16 F).
        correlation = self.correlation.to(torch.promote_types(self.correlation.dtype, torch.float32))
        eigenvalues, eigenvectors = torch.linalg.eigh(correlation)
        largest = eigenvalues.max().clamp_min(1e-12)
        boosted = (eigenvalues.clamp_min(0) / largest).sqrt() + self.eps
        boosted = boosted.clamp_min(self.MIN_EIGENVALUE)
        self.weight.copy_((eigenvectors * boosted) @ eigenvectors.T)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, rho={self.rho}, eps={self.eps}"


def check_predictor_choice(method: str, predictor: str, pred_hidden_dim: int | None, freq: int) -> None:
    """A clear error for a predictor that is not one of ``PREDICTORS``, for DirectPred given an MLP
    predictor's width (its predictor is linear), and for a refresh period below 1."""
    if predictor not in PREDICTORS:
        raise ValueError(f"{method}: unknown predictor {predictor!r}; valid values are {', '.join(PREDICTORS)}.")
    if predictor == "direct_pred" and pred_hidden_dim is not None:
        raise ValueError(
            f"{method}(predictor='direct_pred') uses DirectPred's linear predictor, but pred_hidden_dim="
            f"{pred_hidden_dim} configures a non-linear (MLP) one. Leave pred_hidden_dim unset (null), or use "
            "predictor='mlp'."
        )
    if freq < 1:
        raise ValueError(f"{method}: direct_pred_freq must be at least 1 (optimizer steps between refreshes); got {freq}.")
