"""Permute (activation matching): a one-to-one matching of units by correlation.

For every feature group and every model k != reference, with X the
reference's features and Y model k's (d units each), the correlations come
from the joint covariance blocks::

    corr_ij = (C_0k)_ij / sqrt((C_00)_ii (C_kk)_jj)      (0 where a variance is 0)

and ``scipy.optimize.linear_sum_assignment`` finds the permutation ``perm``
maximising ``sum_i corr_{i, perm[i]}`` (reference unit i <- model unit
perm[i]). The transforms are ``M_k = P`` with ``(P h)[i] = h[perm[i]]``
(:func:`ccamerge.runs.apply.permutation_matrix`) and ``U_k = P^T = P^-1``, so a
single aligned model computes exactly its original function. The quality is
the mean matched correlation ``mean_i corr_{i, perm[i]}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch

from ..maths.algebra import permutation_matrix
from ..maths.stats import JointCovariance
from ..runtime.errors import OptionError
from .base import AlignContext, Alignment, GroupAlignment, MergeMethod, register_method


def correlation(C_xy: torch.Tensor, var_x: torch.Tensor, var_y: torch.Tensor) -> torch.Tensor:
    """``C_xy / sqrt(var_x var_y^T)`` (float64), 0 where either variance is 0.

    ``C_xy``: (a, b) cross-covariance; ``var_x``: (a,), ``var_y``: (b,) variances.
    """
    denom = torch.outer(var_x.clamp_min(0), var_y.clamp_min(0)).sqrt()
    safe = denom > 0
    corr = torch.where(safe, C_xy / torch.where(safe, denom, 1.0), torch.zeros_like(C_xy))
    return corr.clamp(-1.0, 1.0)


def cross_correlation(jc: JointCovariance, i: int, j: int) -> torch.Tensor:
    """(d, d) correlations between the units of model i (rows) and model j (columns)."""
    var_i = torch.diagonal(jc.block(i, i))
    var_j = var_i if i == j else torch.diagonal(jc.block(j, j))
    return correlation(jc.block(i, j), var_i, var_j)


def head_similarity(jc: JointCovariance, i: int, j: int, heads: int) -> torch.Tensor:
    """(heads, heads): for each head of model i and head of model j, the sum of the
    squared canonical correlations of their units: ``|C_ii^-1/2 C_ij C_jj^-1/2|_F^2``,
    the head's width when one head is an invertible map of the other, whatever map
    (a small ridge keeps a singular head finite)."""
    step = jc.d // heads
    whiten = []
    for m in (i, j):
        C = jc.block(m, m)
        parts = []
        for h in range(heads):
            block = C[h * step : (h + 1) * step, h * step : (h + 1) * step]
            evals, evecs = torch.linalg.eigh(block)
            floor = 1e-9 * float(evals.max().clamp_min(1e-300))
            parts.append(evecs @ torch.diag(evals.clamp_min(floor).rsqrt()) @ evecs.T)
        whiten.append(torch.block_diag(*parts))
    K = whiten[0] @ jc.block(i, j) @ whiten[1]
    return K.reshape(heads, step, heads, step).square().sum((1, 3))


def match(score: torch.Tensor) -> torch.Tensor:
    """The permutation ``perm`` (int64, (d,)) maximising ``sum_i score[i, perm[i]]``."""
    from scipy.optimize import linear_sum_assignment  # imported when used: slow to import

    rows, cols = linear_sum_assignment(score.detach().cpu().numpy(), maximize=True)
    perm = torch.empty(score.shape[0], dtype=torch.int64)
    perm[torch.as_tensor(rows, dtype=torch.int64)] = torch.as_tensor(cols, dtype=torch.int64)
    return perm


def permutation_group(
    perms: Sequence[torch.Tensor | None], quality: Sequence[float | None], d: int
) -> GroupAlignment:
    """A group's alignment from one permutation per model (None: the identity)."""
    eye = torch.eye(d, dtype=torch.float64)
    Ms = [eye.clone() if p is None else permutation_matrix(p) for p in perms]
    return GroupAlignment(
        M=Ms,
        U=[M.T.contiguous() for M in Ms],
        quality=list(quality),
        details={"permutation": [None if p is None else p.tolist() for p in perms]},
    )


@register_method
class Permute(MergeMethod):
    """Activation matching: per group, the permutation maximising summed correlations."""

    name = "permute"
    description = "activation matching: permutation maximising the summed unit correlations"
    permutation_only: ClassVar[bool] = True
    auto_candidate = True

    def align(self, ctx: AlignContext) -> Alignment:
        if ctx.stats is None:
            raise OptionError("method 'permute' needs calibration statistics (--data)")
        ref = ctx.reference
        groups = {}
        for g in ctx.spec.groups:
            jc = ctx.stats.groups[g.name]
            perms: list[torch.Tensor | None] = []
            quality: list[float | None] = []
            mins: list[float | None] = []
            for k in range(ctx.n_models):
                if k == ref:
                    perms.append(None)
                    quality.append(None)
                    mins.append(None)
                    continue
                corr = cross_correlation(jc, ref, k).cpu()
                perm = match(corr)
                matched = corr[torch.arange(g.size), perm]
                perms.append(perm)
                quality.append(float(matched.mean()))
                mins.append(float(matched.min()))
            ga = permutation_group(perms, quality, g.size)
            ga.details["min_correlation"] = mins
            groups[g.name] = ga
        return Alignment(groups)
