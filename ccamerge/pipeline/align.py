"""Step 3, align: the merge method(s) asked for, each model aligned to the reference
(``M_k``, ``U_k`` per group), and the per-group quality of an alignment."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..maths.algebra import ones_complement, permutation_matrix
from ..maths.stats import Statistics
from ..methods import (
    AlignContext,
    Alignment,
    MergeMethod,
    list_methods,
    make_method,
    method_class,
    method_parameters,
)
from ..methods.base import AUTO, GroupAlignment
from ..methods.permute import cross_correlation, head_similarity, match
from ..models.spec import FeatureGroup, MergeSpec
from ..runtime.errors import OptionError
from .load import LoadedModels


@dataclass(frozen=True)
class AlignSettings:
    """How the models are aligned: the ``method`` and its ``params`` (values ``'auto'``
    searched, :func:`candidate_methods`), how a search scores its candidates (``select_by``,
    on a held-out ``heldout_fraction`` of the calibration data), and how the statistics
    are gathered (``stats_mode``; ``memory_limit`` bytes, default half the free RAM)."""

    method: str = "cca"
    params: dict[str, Any] = field(default_factory=dict)
    select_by: str = "agreement"
    heldout_fraction: float = 0.2
    stats_mode: str = "auto"
    memory_limit: int | None = None

    def candidates(self, refit: bool) -> list[MergeMethod]:
        """The concrete methods to try (one unless something is ``'auto'``)."""
        return candidate_methods(self.method, self.params, refit)


def auto_methods() -> list[str]:
    """The methods ``method='auto'`` chooses among (those declaring ``auto_candidate``)."""
    return [name for name in list_methods() if method_class(name).auto_candidate]


def merge_defaults(method: str, refit: bool) -> dict[str, Any]:
    """The parameters whose merge default differs from the method's own, as declared
    (``Param.default_with_refit``/``default_without_refit``)."""
    out = {}
    for p in method_class(method).parameters:
        value = p.default_with_refit if refit else p.default_without_refit
        if value is not None:
            out[p.name] = value
    return out


def expand_auto(method: str, params: dict[str, Any]) -> list[MergeMethod]:
    """One candidate per combination of the declared candidates of the parameters set
    to ``'auto'`` (in declaration order); a single method when none is."""
    searched = [p for p in method_class(method).parameters if params.get(p.name) == AUTO]
    for p in searched:
        if not p.candidates:
            raise OptionError(f"method {method!r}: {p.name} declares no candidates for 'auto'")
    fixed = {k: v for k, v in params.items() if k not in {p.name for p in searched}}
    grids = itertools.product(*(p.candidates for p in searched))
    return [
        make_method(method, **fixed, **{p.name: v for p, v in zip(searched, values)})
        for values in grids
    ]


def candidate_methods(
    method: str, params: dict[str, Any], refit: bool = False
) -> list[MergeMethod]:
    """Expand ``'auto'`` parameter values and ``method='auto'`` into concrete candidates;
    a parameter not given takes the merge default its method declares for a merge with
    or without the refit (:func:`merge_defaults`), else the method's own.

    With ``method='auto'`` each candidate (:func:`auto_methods`) takes the given
    parameters it accepts (``--gamma``/``--ridge`` go to cca, ``--alpha``/``--beta`` to
    zipit); its candidates are those of a merge without the refit (cca over the whole
    gamma grid)."""
    if method != "auto":
        return expand_auto(method, {**merge_defaults(method, refit), **params})
    unused = set(params)
    out: list[MergeMethod] = []
    for name in auto_methods():
        accepted = {k: v for k, v in params.items() if k in method_parameters(name)}
        unused -= set(accepted)
        out += candidate_methods(name, accepted)
    if unused:
        raise OptionError(f"--method auto: no candidate takes {', '.join(sorted(unused))}")
    return out


def label(method: MergeMethod) -> str:
    params = ", ".join(f"{k}={v}" for k, v in method.params().items())
    return f"{method.name}({params})" if params else method.name


def make_methods(names: Sequence[str], params: dict[str, Any]) -> list[MergeMethod]:
    """Instantiate each method with the parameters it takes; unknown parameters are errors."""
    if not names:
        raise OptionError("no methods given")
    dupes = sorted({n for n in names if list(names).count(n) > 1})
    if dupes:
        raise OptionError(f"method(s) listed twice: {', '.join(dupes)}")
    methods, used = [], set()
    for name in names:
        accepted = set(method_parameters(name))
        mine = {k: v for k, v in params.items() if k in accepted}
        used |= set(mine)
        methods.append(make_method(name, **mine))
    unused = sorted(set(params) - used)
    if unused:
        raise OptionError(f"no listed method takes {', '.join(unused)} ({', '.join(names)})")
    return methods


def group_report(spec: MergeSpec, alignment: Alignment, reference: int) -> list[dict[str, Any]]:
    rows = []
    for g in spec.groups:
        ga = alignment.groups[g.name]
        q = [v for k, v in enumerate(ga.quality) if k != reference and v is not None]
        mins = [
            v
            for k, v in enumerate(ga.details.get("min_correlation", []))
            if k != reference and v is not None
        ]
        conds = [
            v for k, v in enumerate(ga.details.get("cond", [])) if k != reference and v is not None
        ]
        rows.append(
            {
                "name": g.name,
                "size": g.size,
                "mean_correlation": sum(q) / len(q) if q else None,
                "min_correlation": min(mins) if mins else None,
                "condition_number": max(conds) if conds else None,
                "per_model": ga.quality,
            }
        )
    return rows


def align_models(
    method: MergeMethod, loaded: LoadedModels, reference: int, stats: Statistics | None
) -> Alignment:
    """Every model aligned to model ``reference`` by ``method``; the groups that only
    permutations keep exact (:func:`constrain`) get permutations."""
    alignment = method.align(AlignContext(loaded.spec, loaded.state_dicts, reference, stats))
    return constrain(alignment, loaded.spec, reference, stats)


def constrain(
    alignment: Alignment, spec: MergeSpec, reference: int, stats: Statistics | None
) -> Alignment:
    """``alignment`` with the maps of every ``permutation`` group made permutations that
    keep its ``blocks`` (a depthwise or grouped conv, a GroupNorm, a per-channel gain
    reads the group, docs/custom-models.md): a map that already is one is kept; else
    each model's units are matched to the reference's within each block, by their
    correlation on the calibration data (without statistics: by the map's entries); the
    maps of every ``orthogonal`` group made orthogonal maps keeping the all-ones
    direction (:func:`_orthogonal`); and the maps of every group of ``heads`` made head
    by head (:func:`_by_heads`, groups that follow another taking its order of heads;
    docs/transformers.md)."""
    groups = dict(alignment.groups)
    orders: dict[str, list[torch.Tensor | None]] = {}  # each heads group's order of heads
    for g in spec.groups:
        jc = stats.groups.get(g.name) if stats is not None else None
        if g.heads > 1 and g.name in groups:
            leader = None
            if g.follows is not None:  # heads in the order of the group followed (kept
                n = len(groups[g.name].M)  # as they are when that group was not aligned)
                leader = orders.get(g.follows, [torch.arange(g.heads)] * n)
            groups[g.name], orders[g.name] = _by_heads(g, groups[g.name], reference, jc, leader)
        elif g.permutation and g.name in groups:
            groups[g.name] = _permutations(g, groups[g.name], reference, jc)
        elif g.orthogonal and g.name in groups:
            groups[g.name] = _orthogonal(g, groups[g.name], reference, jc)
    return Alignment(groups)


def _by_heads(
    g: FeatureGroup,
    ga: GroupAlignment,
    reference: int,
    jc: Any,
    leader: list[torch.Tensor | None] | None,
) -> tuple[GroupAlignment, list[torch.Tensor | None]]:
    """The maps of a group of heads made head by head, and the order of heads they take.

    Each model's heads are matched to the reference's by :func:`head_similarity`
    (without statistics: by the mass of the map's blocks), or take the order of the
    group it follows (``leader``). Within each matched
    pair: for ``whole_heads``, the identity; for a group that follows (query/key), the
    orthogonal map closest to the pair's cross-covariance (Procrustes), for a method that
    permutes, the units matched by correlation, else the method's block of the map (its
    inverse for ``U``)."""
    Ms, Us, orders = [], [], []
    step = g.size // g.heads
    for k, (M, U) in enumerate(zip(ga.M, ga.U)):
        if k == reference:
            Ms.append(M)
            Us.append(U)
            orders.append(None)
            continue
        score = (cross_correlation(jc, reference, k) if jc is not None else M).nan_to_num()
        blocks = score.reshape(g.heads, step, g.heads, step)
        if leader is not None:
            order = leader[k]
        elif jc is not None:
            order = match(head_similarity(jc, reference, k, g.heads))
        else:
            order = match(blocks.square().sum((1, 3)))
        assert order is not None
        cross = jc.block(reference, k).reshape(blocks.shape) if jc is not None else blocks
        permutes = g.permutation or _is_permutation(M, 1)
        Mh, Uh = torch.zeros_like(M), torch.zeros_like(M)
        for h, o in enumerate(order.tolist()):
            rows, cols = slice(h * step, (h + 1) * step), slice(o * step, (o + 1) * step)
            if g.whole_heads:
                block = torch.eye(step, dtype=M.dtype, device=M.device)
            elif permutes:
                block = permutation_matrix(match(blocks[h, :, o, :])).to(M)
            elif g.follows is not None:
                u, _, vh = torch.linalg.svd(cross[h, :, o, :].to(M))
                block = u @ vh  # orthogonal: maximises trace(block^T cross)
            else:
                block = M[rows, cols]
            orthogonal = permutes or g.follows is not None or g.whole_heads
            Mh[rows, cols] = block
            Uh[cols, rows] = block.T if orthogonal else torch.linalg.pinv(block)
        Ms.append(Mh)
        Us.append(Uh)
        orders.append(order)
    details = {**ga.details, "heads": f"{g.heads} matched" if leader is None else "followed"}
    return GroupAlignment(Ms, Us, list(ga.quality), details), orders


def _orthogonal(g: FeatureGroup, ga: GroupAlignment, reference: int, jc: Any) -> GroupAlignment:
    """Each model's map made the orthogonal ``M`` with ``M 1 = 1`` closest to mapping its
    units onto the reference's: on the units orthogonal to the all-ones direction, the
    orthogonal factor of the cross-covariance with the reference (orthogonal
    Procrustes; without statistics, of the method's map), the all-ones direction kept.
    A map that already is one (a permutation, the identity) is kept; ``U = M^T``."""
    d, like = g.size, ga.M[0]
    eye = torch.eye(d, dtype=like.dtype, device=like.device)
    ones = torch.ones(d, 1, dtype=like.dtype, device=like.device)
    basis = ones_complement(d, like.dtype, like.device)
    Ms = []
    for k, M in enumerate(ga.M):
        if k == reference or (torch.allclose(M @ M.T, eye) and torch.allclose(M @ ones, ones)):
            Ms.append(M)
            continue
        cross = jc.block(reference, k).to(M) if jc is not None else M
        u, _, vh = torch.linalg.svd(basis.T @ cross @ basis)
        Ms.append(basis @ (u @ vh) @ basis.T + ones @ ones.T / d)
    details = {**ga.details, "orthogonal": "Procrustes, all-ones direction kept"}
    return GroupAlignment(Ms, [M.T.contiguous() for M in Ms], list(ga.quality), details)


def _permutations(g: FeatureGroup, ga: GroupAlignment, reference: int, jc: Any) -> GroupAlignment:
    Ms = []
    for k, M in enumerate(ga.M):
        if k == reference or _is_permutation(M, g.blocks):
            Ms.append(M)
            continue
        score = cross_correlation(jc, reference, k) if jc is not None else M
        perm = torch.arange(g.size)
        step = g.size // g.blocks
        for b in range(0, g.size, step):
            perm[b : b + step] = b + match(score[b : b + step, b : b + step].nan_to_num())
        Ms.append(permutation_matrix(perm).to(M))
    details = {**ga.details, "permutation": "matched within blocks" if g.blocks > 1 else "matched"}
    return GroupAlignment(Ms, [M.T.contiguous() for M in Ms], list(ga.quality), details)


def _is_permutation(M: torch.Tensor, blocks: int) -> bool:
    """Whether ``M`` is a permutation matrix keeping ``blocks`` equal blocks."""
    ones = (M == 1).sum(1)
    if not bool(((M == 0) | (M == 1)).all()) or not bool((ones == 1).all()):
        return False
    if not bool(((M == 1).sum(0) == 1).all()):
        return False
    step = M.shape[0] // blocks
    rows, cols = torch.nonzero(M, as_tuple=True)
    return bool((rows // step == cols // step).all())


def aligned_parameters(
    spec: MergeSpec,
    model: nn.Module,
    alignment: Alignment,
    unaligned_layers: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """How many of ``model``'s parameters a feature-group map transforms: those of the
    layers with a tensor in a group whose maps are not all the identity, or in a
    concatenation or the head copies of such a group (a layer's bias counts with its
    weight, the logits' bias too), unless the layer is in ``unaligned_layers`` (its output
    units were left untransformed: ``LoadedModels.unaligned_layers``); the rest are only
    averaged, counted by kind of layer (``kept_averaged``, largest first)."""
    moved = {
        name
        for name, ga in alignment.groups.items()
        if any(
            not torch.equal(M, torch.eye(M.shape[0], dtype=M.dtype, device=M.device)) for M in ga.M
        )
    }
    moved |= {c.name for c in spec.concats if any(p in moved for p, _ in c.parts)}
    moved |= {c.name for c in spec.copies if c.group in moved}
    owners = {t.rpartition(".")[0] for t, axes in spec.axes.items() if moved & set(axes.values())}
    aligned, total, kept = 0, 0, Counter()
    modules = dict(model.named_modules())
    for name, p in model.named_parameters():
        owner = name.rpartition(".")[0]
        m = modules[owner]
        total += p.numel()
        if owner not in unaligned_layers and owner in owners:
            aligned += p.numel()
        else:
            kept[_kind(m)] += p.numel()
    return {
        "parameters": aligned,
        "total": total,
        "fraction": aligned / total if total else 0.0,
        "kept_averaged": dict(kept.most_common()),
    }


def _kind(m: nn.Module) -> str:
    groups = getattr(m, "groups", 1)
    return f"{type(m).__name__} (groups={groups})" if groups != 1 else type(m).__name__


def aligned_warning(aligned: dict[str, Any]) -> str | None:
    """A warning when less than half the parameters were aligned, naming what was not."""
    if aligned["total"] == 0 or aligned["fraction"] >= 0.5:
        return None
    kinds = ", ".join(f"{k} ({n:,})" for k, n in list(aligned["kept_averaged"].items())[:4])
    return (
        f"only {aligned['fraction']:.0%} of the parameters were aligned; kept averaged: "
        f"{kinds} (docs/custom-models.md says what discovery aligns)"
    )
