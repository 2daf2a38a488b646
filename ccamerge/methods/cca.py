"""CCA Merge: align each model's features to the reference's with CCA.

Notation of docs/cca.md, 'The CCA transform'. With X the reference's features and
Y model k's (samples as rows, d columns each):

    S_xx = C_00 + r_x I,  S_yy = C_kk + r_y I,  S_xy = C_0k
    K = S_xx^-1/2 S_xy S_yy^-1/2 = U diag(rho) V^T
    T_k = S_yy^-1/2 V U^T S_xx^1/2,   T_k^-1 = S_xx^-1/2 U V^T S_yy^1/2

so that Y T_k ~ X. With features as column vectors, model k's units map into
the reference's space by M_k = T_k^T and back by U_k = M_k^-1.

The ridge r is scale-relative by default, r = gamma * trace(C)/d for each
side, so one ``gamma`` means the same in every layer whatever its activation
scale; ``ridge="absolute"`` uses r = gamma as the paper's code does.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch

from .base import AlignContext, Alignment, GroupAlignment, MergeMethod, Param, register_method
from .permute import head_similarity, match

_EIG_FLOOR = 1e-12  # relative to the largest eigenvalue
_RIDGE_FLOOR = 1e-12  # absolute, keeps an all-dead group invertible

GAMMA_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)  # what gamma 'auto' tries
# With the refit, the CCA ridge matters little and is fixed (no candidate search): on
# ResNet20 x1 gamma 0.1 / 1 / 10 gave 83.0 / 83.6 / 83.7 %, on the MLP 87.8 / 87.9 / 88.0 %.
# Without it, the ridge is chosen on held-out calibration data.
REFIT_GAMMA = 1.0


@dataclass(frozen=True)
class CCAResult:
    """T (d x d): model k -> reference coordinates (rows as samples); T_inv its inverse;
    rho (d,): singular values of the regularised K, descending; corr (d,): the actual
    correlation of each pair of canonical variates on the (unregularised) statistics,
    which is what the report shows; cond: the larger condition number of the two
    regularised covariances."""

    T: torch.Tensor
    T_inv: torch.Tensor
    rho: torch.Tensor
    corr: torch.Tensor
    cond: float


@dataclass(frozen=True)
class SymEig:
    """Eigendecomposition of a symmetric PSD matrix C, reused for every ridge r:
    C + r I has the same eigenvectors and eigenvalues shifted by r."""

    evals: torch.Tensor
    evecs: torch.Tensor

    @classmethod
    def of(cls, C: torch.Tensor) -> SymEig:
        evals, evecs = torch.linalg.eigh(C)
        return cls(evals.clamp_min(0), evecs)

    def powers(self, r: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``((C + rI)^1/2, (C + rI)^-1/2, cond)``; eigenvalues below ``_EIG_FLOOR``
        times the largest are clamped to it."""
        evals = self.evals + r
        top = float(evals.max().clamp_min(_RIDGE_FLOOR))
        evals = evals.clamp_min(top * _EIG_FLOOR)
        root = evals.sqrt()
        half = (self.evecs * root) @ self.evecs.T
        inv_half = (self.evecs / root) @ self.evecs.T
        return half, inv_half, float(top / evals.min())


def ridge(C: torch.Tensor, gamma: float, relative: bool) -> float:
    if relative:
        return max(gamma * float(torch.trace(C)) / C.shape[0], _RIDGE_FLOOR)
    return max(gamma, _RIDGE_FLOOR)


def cca_transform(
    C_xx: torch.Tensor,
    C_yy: torch.Tensor,
    C_xy: torch.Tensor,
    gamma: float,
    relative: bool = True,
    eig_x: SymEig | None = None,
    eig_y: SymEig | None = None,
) -> CCAResult:
    """CCA of two views from their (cross-)covariances, all float64 d x d.

    ``eig_x``/``eig_y`` may pass the eigendecompositions of C_xx/C_yy when they
    are reused (several models or several ridges)."""
    eig_x = eig_x or SymEig.of(C_xx)
    eig_y = eig_y or SymEig.of(C_yy)
    Sxx_half, Sxx_inv_half, cond_x = eig_x.powers(ridge(C_xx, gamma, relative))
    Syy_half, Syy_inv_half, cond_y = eig_y.powers(ridge(C_yy, gamma, relative))
    K = Sxx_inv_half @ C_xy @ Syy_inv_half
    U, rho, Vh = torch.linalg.svd(K)
    V = Vh.T
    T = Syy_inv_half @ V @ U.T @ Sxx_half
    T_inv = Sxx_inv_half @ U @ V.T @ Syy_half
    P_x, P_y = Sxx_inv_half @ U, Syy_inv_half @ V
    cross = ((C_xy @ P_y) * P_x).sum(0)
    var_x = ((C_xx @ P_x) * P_x).sum(0).clamp_min(0)
    var_y = ((C_yy @ P_y) * P_y).sum(0).clamp_min(0)
    denom = (var_x * var_y).sqrt()
    corr = torch.where(denom > 0, cross / denom.clamp_min(1e-300), torch.zeros_like(cross))
    return CCAResult(
        T=T,
        T_inv=T_inv,
        rho=rho.clamp(0.0, 1.0),
        corr=corr.clamp(-1.0, 1.0),
        cond=max(cond_x, cond_y),
    )


# Eigendecompositions of each model's covariance block, kept while the statistics
# live, so that trying several ridges (``--gamma auto``) decomposes each block once.
_EIG_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _eig(jc: Any, k: int) -> SymEig:
    per_model = _EIG_CACHE.setdefault(jc, {})
    if k not in per_model or per_model[k][0] != jc.n:  # recomputed if samples were added
        per_model[k] = (jc.n, SymEig.of(jc.block(k, k)))
    return per_model[k][1]


@register_method
class CCA(MergeMethod):
    """CCA Merge. ``gamma``: ridge, relative to each covariance's mean variance
    unless ``ridge == "absolute"``."""

    name = "cca"
    description = "CCA Merge: invertible linear alignment by canonical correlation analysis"
    auto_candidate = True
    parameters = (
        Param(
            "gamma",
            float,
            0.1,
            "ridge, relative to each layer's mean variance unless ridge is absolute",
            low=0.0,
            candidates=GAMMA_GRID,
            default_with_refit=REFIT_GAMMA,
            default_without_refit="auto",
        ),
        Param(
            "ridge",
            str,
            "relative",
            "how gamma scales: relative (gamma x the mean variance) or absolute (gamma)",
            choices=("relative", "absolute"),
        ),
    )

    def align(self, ctx: AlignContext) -> Alignment:
        if ctx.stats is None:
            raise ValueError("CCA needs calibration statistics")
        ref, N = ctx.reference, ctx.n_models
        groups = {}
        for g in ctx.spec.groups:
            jc = ctx.stats.groups[g.name]
            eye = torch.eye(g.size, dtype=torch.float64, device=jc.Q.device)
            ga = GroupAlignment(M=[], U=[], quality=[], details={"min_correlation": [], "cond": []})
            C_xx = jc.block(ref, ref)
            eig_x = _eig(jc, ref)
            for k in range(N):
                if k == ref:
                    ga.M.append(eye.clone())
                    ga.U.append(eye.clone())
                    ga.quality.append(None)
                    ga.details["min_correlation"].append(None)
                    ga.details["cond"].append(None)
                    continue
                if g.heads > 1 and g.follows is None:
                    M, U, res = self._by_heads(jc, ref, k, g.heads)
                else:
                    res = cca_transform(
                        C_xx,
                        jc.block(k, k),
                        jc.block(ref, k),
                        self.gamma,
                        self.ridge == "relative",
                        eig_x,
                        _eig(jc, k),
                    )
                    M, U = res.T.T.contiguous(), res.T_inv.T.contiguous()
                ga.M.append(M)
                ga.U.append(U)
                ga.quality.append(float(res.corr.mean()))
                ga.details["min_correlation"].append(float(res.corr.min()))
                ga.details["cond"].append(res.cond)
            groups[g.name] = ga
        return Alignment(groups)

    def _by_heads(
        self, jc: Any, ref: int, k: int, heads: int
    ) -> tuple[torch.Tensor, torch.Tensor, CCAResult]:
        """An attention layer's values (docs/transformers.md): model k's heads matched to
        the reference's (:func:`head_similarity`), then a CCA per matched pair of heads;
        the maps are block-permuted block-diagonal. The result's correlations are all
        heads'."""
        step = jc.d // heads
        order = match(head_similarity(jc, ref, k, heads))
        Cr, Ck, Crk = jc.block(ref, ref), jc.block(k, k), jc.block(ref, k)
        M, U = torch.zeros_like(Cr), torch.zeros_like(Cr)
        results = []
        for h, o in enumerate(order.tolist()):
            rows, cols = slice(h * step, (h + 1) * step), slice(o * step, (o + 1) * step)
            res = cca_transform(
                Cr[rows, rows], Ck[cols, cols], Crk[rows, cols], self.gamma,
                self.ridge == "relative",
            )  # fmt: skip
            M[rows, cols], U[cols, rows] = res.T.T, res.T_inv.T
            results.append(res)
        corr = torch.cat([r.corr for r in results])
        rho = torch.cat([r.rho for r in results])
        worst = max(r.cond for r in results)
        return M, U, CCAResult(T=M.T, T_inv=U.T, rho=rho, corr=corr, cond=worst)
