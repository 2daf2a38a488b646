"""ZipIt! (Stoica et al., ICLR 2024): greedy zipping of features within and across models.

Per feature group, the N models' d units are pooled into ``n = N d`` features
and zipped back to d features ("full zipping"; partial zipping is not
offered). The exact rule implemented here:

1. Correlations ``R`` (n x n) of all features, from the joint covariance of
   all N models: ``R_ab = C_ab / sqrt(C_aa C_bb)`` (0 where a variance is 0).
2. Every feature starts as its own cluster. The linkage of two clusters A, B
   is ``L(A, B) = min_{a in A, b in B} R_ab`` (ZipIt replaces the
   correlations of a merged feature by the elementwise minimum of its two
   parts). Its greedy score is ``L * alpha^r`` when ``L > 0`` (else ``L``),
   with ``r = (|A| - 1) + (|B| - 1)`` the merges the two clusters already
   took part in: ``alpha`` in [0, 1] is ZipIt's *repeated matching*
   parameter, the discount on merging an already merged feature again
   (``alpha = 1``: no discount; ``alpha = 0``: only after every fresh pair
   with a positive correlation).
3. A merge is *same-model* when A and B both hold a unit of some model m
   (a match within one model). ``beta`` in [0, 1] is ZipIt's *same-model
   budget*: each model may take part in ``floor(beta (N-1) d / N)``
   same-model merges; a same-model merge uses one unit of budget of every
   model that both clusters hold. ``beta = 0`` allows cross-model merges
   only.
4. Repeat ``(N-1) d`` times: merge the pair with the highest score among the
   pairs the budget allows. If no pair is allowed (greedy cross-model
   matching can get stuck for N > 2), merge the best-scoring pair anyway and
   count it in ``details["forced_merges"]``.
5. The d clusters are ordered by their smallest reference unit (clusters
   without one last), so that identical models zip to the reference's order.

Each zipped unit c is the mean of its members: ``f_c = (1/|c|) sum_{(k,j) in
c} f_kj``. With the merge weights ``w_k`` of ``merge_state_dicts`` that is

    M_k[c, j] = N / |c|   if unit j of model k is in c, else 0     (d x d)
    U_k[j, c] = 1         if unit j of model k is in c, else 0     (d x d)

so the default uniform weights ``w_k = 1/N`` give exactly ZipIt's average
(other weights give ``sum_{(k,j) in c} N w_k f_kj / |c|``, the weighted mean
when c holds one unit of every model). ``M_k`` maps model k's units into the
zipped space ("merge") and ``U_k`` back ("unmerge": a model's weights that
read unit j now read the zipped unit holding it); ``M_k`` is not invertible
in general, and ``M_k U_k`` is not the identity when a model has two units
in one cluster. With one unit per model in every cluster (a permutation), it
is exactly the permutation alignment.

The quality of model k is the mean correlation between the reference's and
model k's units that were zipped together (0 if none were).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..maths.stats import PairwiseCovariance
from ..runtime.errors import OptionError
from .base import AlignContext, Alignment, GroupAlignment, MergeMethod, Param, register_method
from .permute import correlation

_NEG = float("-inf")


@dataclass
class Zipped:
    """Result of zipping one group: ``clusters[c]`` lists the global unit indices
    ``k * d + j`` zipped into unit c (c ordered as in rule 5)."""

    clusters: list[list[int]]
    merge_scores: list[float] = field(default_factory=list)
    same_model_merges: int = 0
    forced_merges: int = 0


def zip_features(
    R: torch.Tensor, N: int, d: int, alpha: float, beta: float, ref: int = 0
) -> Zipped:
    """Greedy ZipIt matching on the (N d x N d) correlation matrix ``R`` (rules 2-5);
    feature ``k * d + j`` is unit j of model k, ``ref`` the reference model."""
    n = N * d
    R = R.to(torch.float64)
    model_of = torch.arange(n) // d
    present = torch.zeros(n, N, dtype=torch.bool)
    present[torch.arange(n), model_of] = True
    budget = torch.full((N,), int(beta * (N - 1) * d / N + 1e-9), dtype=torch.int64)
    active = torch.ones(n, dtype=torch.bool)
    repeats = torch.zeros(n, dtype=torch.float64)
    members: list[list[int]] = [[u] for u in range(n)]
    L = R.clone()
    base = R.clone()  # discounted scores; -inf on the diagonal and for merged-away clusters
    base.fill_diagonal_(_NEG)
    cand = base.clone()  # base, and -inf where the budget forbids the pair
    for m in torch.nonzero(budget <= 0).flatten().tolist():
        cand[present[:, m][:, None] & present[:, m][None, :]] = _NEG
    out = Zipped(clusters=[])

    for _ in range((N - 1) * d):
        flat = int(cand.argmax())
        if cand.view(-1)[flat] == _NEG:
            flat = int(base.argmax())
            out.forced_merges += 1
        i, j = sorted(divmod(flat, n))
        out.merge_scores.append(float(L[i, j]))
        shared = present[i] & present[j]
        if shared.any():
            out.same_model_merges += 1
            budget[shared] -= 1
        # merge cluster j into cluster i
        members[i] += members[j]
        active[j] = False
        present[i] |= present[j]
        repeats[i] += repeats[j] + 1
        L[i] = torch.minimum(L[i], L[j])
        L[:, i] = L[i]
        row = torch.where(L[i] > 0, L[i] * alpha ** (repeats[i] + repeats), L[i])
        row[~active] = _NEG
        row[i] = _NEG
        base[i], base[:, i] = row, row
        base[j], base[:, j] = _NEG, _NEG
        exhausted = budget <= 0
        blocked = (present[:, exhausted] & present[i, exhausted]).any(1)
        crow = row.masked_fill(blocked, _NEG)
        cand[i], cand[:, i] = crow, crow
        cand[j], cand[:, j] = _NEG, _NEG
        for m in torch.nonzero(shared & exhausted).flatten().tolist():
            cand[present[:, m][:, None] & present[:, m][None, :]] = _NEG

    clusters = [sorted(members[u]) for u in torch.nonzero(active).flatten().tolist()]

    def position(c: list[int]) -> int:
        own = [u - ref * d for u in c if u // d == ref]
        return min(own) if own else n + c[0]

    clusters.sort(key=position)
    out.clusters = clusters
    return out


def zip_transforms(zipped: Zipped, N: int, d: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``(M_k, U_k)`` per model (d x d float64) from the clusters: the merge/unmerge rule."""
    Ms = [torch.zeros(d, d, dtype=torch.float64) for _ in range(N)]
    Us = [torch.zeros(d, d, dtype=torch.float64) for _ in range(N)]
    for c, cluster in enumerate(zipped.clusters):
        for u in cluster:
            k, j = divmod(u, d)
            Ms[k][c, j] = N / len(cluster)
            Us[k][j, c] = 1.0
    return Ms, Us


@register_method
class ZipIt(MergeMethod):
    """ZipIt! full zipping. ``alpha``: repeated-matching discount in [0, 1];
    ``beta``: same-model merge budget in [0, 1] (fraction, rule 3)."""

    name = "zipit"
    description = "ZipIt!: greedy zipping of correlated features within and across models"
    needs_all_blocks = True
    auto_candidate = True
    parameters = (
        Param("alpha", float, 0.5, "repeated-matching discount", low=0.0, high=1.0),
        Param(
            "beta",
            float,
            0.0,
            "same-model merge budget, a fraction of the units",
            low=0.0,
            high=1.0,
        ),
    )

    def align(self, ctx: AlignContext) -> Alignment:
        if ctx.stats is None:
            raise OptionError("method 'zipit' needs calibration statistics (--data)")
        ref, N = ctx.reference, ctx.n_models
        groups = {}
        for g in ctx.spec.groups:
            jc = ctx.stats.groups[g.name]
            if isinstance(jc, PairwiseCovariance):
                raise OptionError(
                    "method 'zipit' needs the joint covariance of all models, but the statistics "
                    "were gathered pairwise (reference x model); rerun with joint statistics"
                )
            d = g.size
            C = jc.cov.cpu()
            diag = torch.diagonal(C)
            R = correlation(C, diag, diag)
            zipped = zip_features(R, N, d, self.alpha, self.beta, ref)
            Ms, Us = zip_transforms(zipped, N, d)
            quality: list[float | None] = [None] * N
            for k in range(N):
                if k == ref:
                    continue
                pairs = [
                    float(R[a, b])
                    for c in zipped.clusters
                    for a in c
                    if a // d == ref
                    for b in c
                    if b // d == k
                ]
                quality[k] = sum(pairs) / len(pairs) if pairs else 0.0
            groups[g.name] = GroupAlignment(
                M=Ms,
                U=Us,
                quality=quality,
                details={
                    "same_model_merges": zipped.same_model_merges,
                    "forced_merges": zipped.forced_merges,
                    "mean_merge_correlation": sum(zipped.merge_scores)
                    / max(len(zipped.merge_scores), 1),
                    "cluster_sizes": [len(c) for c in zipped.clusters],
                },
            )
        return Alignment(groups)
