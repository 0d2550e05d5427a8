"""MSBReg's three losses (Moon, Buracas, Park, Kim, Canny, "An Embedding-Dynamic Approach to
Self-supervised Learning", arXiv 2207.03552, WACV 2023).

The paper treats the embeddings as particles on the unit sphere and gives each force its own loss:
the multiview centroid loss attracts the views of an image, the singular value loss disperses the
whole system towards a homogeneous density, and the Brownian diffusive loss moves every particle
in a random direction (a local dispersion that needs no other particle's position). Every loss
works on L2-normalised rows, in float32 (float64 stays float64) with autocast off, over the global
batch (see ``ssl_lightning.distributed`` for the gradient convention).

Only the paper's introduction, abstract and Figure 1 caption could be read where this was written
(its method section and appendix could not, and no official code was found), so the equations below
are this library's reading of those descriptions; each loss's docstring states its choices.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_lightning.distributed import all_reduce_sum, gather
from ssl_lightning.losses._checks import check_paired_rows

#: Newton-Schulz iterations of the singular value loss: enough for eigenvalues of the normalised Gram
#: matrix down to ~1e-9 of its norm (a spectrum falling as k^-4 over 256 dimensions converges in 30)
SINGULAR_VALUE_ITERATIONS = 30


def multiview_centroid_loss(online: Tensor, target: Tensor) -> Tensor:
    """The multiview centroid loss: each online view of an image is pulled towards the centroid of
    the target network's views of that image.

    With V views of N images, q_{v,n} = online_{v,n} / ||online_{v,n}|| (the online network's
    predictions) and t_{v,n} the target network's projections likewise normalised:

        c_n = (1/V) sum_v t_{v,n},      c^_n = c_n / ||c_n||
        L   = 1/(V N) sum_n sum_v || q_{v,n} - c^_n ||^2  =  1/(V N) sum_{n,v} (2 - 2 cos(q_{v,n}, c_n))

    Choices (the paper's Figure 1 describes "minimis[ing] the distance between centroids of online and
    target network embeddings of different views", its abstract "an attractive force to pull different
    image view embeddings toward their centroid"): every online view is pulled to the target centroid,
    so L = || mean_v q_{v,n} - c^_n ||^2 + the spread of the online views around their own mean, i.e.
    the distance between the centroids plus the attraction of the views; the centroid is put back on
    the sphere, so that L, like BYOL's loss, lies in [0, 4] and is 0 exactly when all views agree; the
    target centroid includes the view being predicted (all V views, with weight 1/V each). With V = 1
    this is BYOL's normalised regression of one view on itself.

    ``target`` is the EMA target's output; the caller detaches it (gradients flow into it if it
    requires them). A centroid of zero (targets that cancel) contributes 2 per view and no gradient.

    Args:
        online: [V, N, D] online predictions, view-major.
        target: [V, N, D] target projections, entry (v, n) the same view of the same image as ``online``'s.

    Returns:
        The scalar loss, the mean over the global batch's V x N rows.
    """
    if online.dim() != 3 or online.shape != target.shape or 0 in online.shape[::2]:
        raise ValueError(
            "multiview_centroid_loss expects online and target of the same shape [V, N, D] (views, images, "
            f"dimensions; V, D >= 1), got {tuple(online.shape)} and {tuple(target.shape)}"
        )
    dtype = torch.promote_types(online.dtype, torch.float32)
    with torch.autocast(online.device.type, enabled=False):
        predictions = F.normalize(online.to(dtype), dim=2)
        centroid = F.normalize(F.normalize(target.to(dtype), dim=2).mean(dim=0), dim=1)  # [N, D]
        per_row = 2 - 2 * (predictions * centroid.unsqueeze(0)).sum(dim=2)  # [V, N]
        loss_sum, count = all_reduce_sum(torch.stack([per_row.sum(), per_row.new_tensor(per_row.numel())]))
        return loss_sum / count


def singular_value_loss(z: Tensor, iterations: int = SINGULAR_VALUE_ITERATIONS) -> Tensor:
    """The singular value loss: minus the normalised nuclear norm of the batch of unit embeddings.

    With Z^ the global batch's N rows z_i / ||z_i|| (D columns, r = min(N, D)) and sigma_k its
    singular values:

        L = - 1/sqrt(N r) sum_k sigma_k(Z^)        in [-1, -1/sqrt(r)]

    Unit rows fix sum_k sigma_k^2 = ||Z^||_F^2 = N, so the sum of the singular values is largest, and
    L = -1, exactly when they are all equal: when Z^T Z^ is isotropic (N >= D), the second moment of
    a uniform distribution on the sphere, with decorrelated dimensions. A collapsed batch (one
    direction) gives -1/sqrt(r). The gradient -U V^T / sqrt(N r) = -Z^ (Z^T Z^)^(-1/2) / sqrt(N r)
    moves each particle towards its whitened position: the paper's global dispersive force "towards
    spatially homogeneous density" that "decorrelates the different feature dimensions".

    Choices: the paper's equation could not be read (module docstring); the normalised nuclear norm
    is the singular-value function whose optimum is the homogeneous state the paper describes and
    that stays finite, with a finite gradient, at collapse (a sum of log sigma_k would not); 1/sqrt(N r)
    makes it independent of the batch size and the width. Rows are not centred (a collapsed batch
    would otherwise be the zero matrix). One batch of one image gives -1 and no gradient.

    sum_k sigma_k = trace((G)^(1/2)) for the r x r Gram matrix G (Z^ Z^T or Z^T Z^, the smaller), computed
    by coupled Newton-Schulz iterations on G / ||G||_F (matrix products only). torch's SVD and
    eigendecompositions read their solver's status on the host at every call, a host sync per
    training step on a GPU; this never syncs. It matches the exact singular values to float precision
    for eigenvalues of G down to ~1e-9 ||G||_F; smaller ones (sigma below ~3e-5 sigma_max) are
    underestimated, and their gradient is bounded where the exact one (1 / sigma) diverges.

    Args:
        z: [N, D] embeddings of this rank; need not be normalised. All ranks' rows are gathered.
        iterations: Newton-Schulz iterations (see ``SINGULAR_VALUE_ITERATIONS``).

    Returns:
        The scalar loss, the same on every rank.
    """
    if z.dim() != 2 or z.shape[1] == 0:
        raise ValueError(f"singular_value_loss expects embeddings of shape [N, D] with D >= 1, got {tuple(z.shape)}")
    if iterations < 1:
        raise ValueError(f"singular_value_loss needs iterations >= 1 (Newton-Schulz steps), got {iterations}")
    dtype = torch.promote_types(z.dtype, torch.float32)
    with torch.autocast(z.device.type, enabled=False):
        rows = F.normalize(gather(z.to(dtype)), dim=1)
        n, d = rows.shape
        if n == 0:
            raise ValueError("singular_value_loss got no rows on any rank: the global batch is empty")
        gram = rows @ rows.T if n <= d else rows.T @ rows
        return -trace_of_square_root(gram, iterations) / math.sqrt(n * min(n, d))


def trace_of_square_root(gram: Tensor, iterations: int = SINGULAR_VALUE_ITERATIONS) -> Tensor:
    """trace(G^(1/2)) of a symmetric positive semi-definite G, by the coupled Newton-Schulz iteration

        A = G / ||G||_F,  Y_0 = A,  Z_0 = I,  T_k = (3 I - Z_k Y_k) / 2,  Y_{k+1} = Y_k T_k,  Z_{k+1} = T_k Z_k

    (Y_k -> A^(1/2), Z_k -> A^(-1/2); Higham, "Functions of Matrices", 2008, eq. 6.35): the eigenvalues of
    A lie in [0, 1], where it converges; zero eigenvalues stay zero. Differentiable, no host sync.
    """
    scale = torch.linalg.matrix_norm(gram).clamp_min(torch.finfo(gram.dtype).tiny)
    normalised = gram / scale
    identity = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    root, inverse_root = normalised, identity
    for _ in range(iterations):
        step = 1.5 * identity - 0.5 * (inverse_root @ root)
        root, inverse_root = root @ step, step @ inverse_root
    return torch.diagonal(root).sum() * scale.sqrt()


def brownian_diffusive_loss(z: Tensor, directions: Tensor) -> Tensor:
    """The Brownian diffusive loss: the mean cosine of each embedding with its own random direction.

        L = 1/N sum_i cos(z_i, r_i)

    over the global batch's N rows, with ``directions`` r_i drawn afresh every step by the caller
    (isotropic Gaussian rows, so r_i / ||r_i|| is uniform on the sphere). Its expectation is zero, and
    so is its value's meaning: minimising it kicks each unit embedding along the tangent part of -r_i
    by a step set by the loss weight, a random walk on the sphere (Brownian motion) that keeps
    particles from settling onto each other without looking at any other particle.

    Choices: one independent direction per row (per particle: every view of every image), normalised,
    so the loss weight alone sets the noise scale; the directions are an argument so that the loss is
    a pure, testable function.

    Args:
        z: [N, D] embeddings of this rank; need not be normalised.
        directions: [N, D] random directions (need not be normalised), row i for row i of ``z``.

    Returns:
        The scalar loss, the mean over the global batch.
    """
    check_paired_rows("brownian_diffusive_loss", z, directions, names=("z", "directions"))
    dtype = torch.promote_types(z.dtype, torch.float32)
    with torch.autocast(z.device.type, enabled=False):
        cosine = (F.normalize(z.to(dtype), dim=1) * F.normalize(directions.to(dtype), dim=1)).sum(dim=1)
        loss_sum, count = all_reduce_sum(torch.stack([cosine.sum(), cosine.new_tensor(z.shape[0])]))
        return loss_sum / count
