"""Weight matching (Ainsworth et al., "Git Re-Basin", ICLR 2023): data-free permutations.

For model k against the reference, find one permutation ``perm_g`` per feature
group g maximising the weight agreement

    J(perm) = sum over every grouped tensor t of <W_ref^t, pi(W_k^t)>

where ``pi`` reorders each grouped axis of the tensor by its group's
permutation (``pi(W)[i, j] = W[perm_a[i], perm_b[j]]`` for a weight whose
axis 0 is in group a and axis 1 in group b; vectors likewise on axis 0).

Coordinate descent: sweeps over the groups in a random order (seeded). The
step for group g holds the other permutations fixed, so J restricted to
``perm_g`` is linear:

    A_g = sum over members (t, axis) of R_t S_t^T        (d x d)

with ``R_t`` the reference tensor and ``S_t`` model k's tensor (its other
grouped axes already permuted) both moved to have the group axis first and
reshaped to (d, -1). ``scipy.optimize.linear_sum_assignment`` maximises
``sum_i A_g[i, perm[i]]``. A new permutation is kept only when it raises J
(computed exactly, which also covers a tensor whose two axes lie in the same
group), so J never decreases; sweeps stop when no permutation changes, or
after ``max_iter`` sweeps. ``details["objective"][k]`` lists J before the
first sweep and after each one.

Transforms: ``M_k = P`` with ``(P h)[i] = h[perm[i]]``, ``U_k = P^T``. The
quality per group is the cosine between the group's tensors of the reference
and of the aligned model k (all member tensors flattened and concatenated).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch

from ..models.spec import MergeSpec
from .base import AlignContext, Alignment, MergeMethod, Param, register_method
from .permute import match, permutation_group

Perms = dict[str, torch.Tensor]


def permute_axes(
    t: torch.Tensor, axes: Mapping[int, str], perms: Perms, skip: int | None = None
) -> torch.Tensor:
    """``t`` with each grouped axis (except ``skip``) reordered by its group's permutation."""
    for axis, group in axes.items():
        if axis != skip and group in perms and t.shape[axis] == perms[group].numel():
            t = t.index_select(axis, perms[group])  # (a grouped conv's input axis: left)
    return t


def agreement(
    ref: Mapping[str, torch.Tensor],
    other: Mapping[str, torch.Tensor],
    spec: MergeSpec,
    perms: Perms,
    names: list[str],
) -> float:
    """``sum_t <ref[t], pi(other[t])>`` over the tensors ``names`` (float64)."""
    return float(sum((ref[n] * permute_axes(other[n], spec.axes[n], perms)).sum() for n in names))


def weight_match(
    ref: Mapping[str, torch.Tensor],
    other: Mapping[str, torch.Tensor],
    spec: MergeSpec,
    max_iter: int,
    generator: torch.Generator,
) -> tuple[Perms, list[float]]:
    """Coordinate descent for one model; returns the permutations and J per sweep.

    ``ref`` and ``other`` hold float64 tensors for every grouped tensor name."""
    perms: Perms = {g.name: torch.arange(g.size) for g in spec.groups}
    touching = {g.name: list(dict.fromkeys(n for n, _ in g.members)) for g in spec.groups}
    everything = list(spec.axes)
    objective = [agreement(ref, other, spec, perms, everything)]
    for _ in range(max_iter):
        changed = False
        for gi in torch.randperm(len(spec.groups), generator=generator).tolist():
            g = spec.groups[gi]
            A = torch.zeros(g.size, g.size, dtype=torch.float64)
            for name, axis in g.members:
                if ref[name].shape[axis] != g.size:
                    continue  # a grouped conv's input axis: its blocks are kept afterwards
                R = ref[name].movedim(axis, 0).reshape(g.size, -1)
                S = permute_axes(other[name], spec.axes[name], perms, skip=axis)
                A += R @ S.movedim(axis, 0).reshape(g.size, -1).T
            candidate = match(A)
            if torch.equal(candidate, perms[g.name]):
                continue
            old = agreement(ref, other, spec, perms, touching[g.name])
            new = agreement(ref, other, spec, {**perms, g.name: candidate}, touching[g.name])
            if new > old + 1e-10 * max(abs(old), 1e-30):
                perms[g.name] = candidate
                changed = True
        objective.append(agreement(ref, other, spec, perms, everything))
        if not changed:
            break
    return perms, objective


def group_cosine(
    ref: Mapping[str, torch.Tensor],
    other: Mapping[str, torch.Tensor],
    spec: MergeSpec,
    perms: Perms,
    names: list[str],
) -> float:
    """Cosine between the concatenated tensors ``names`` of ``ref`` and aligned ``other``."""
    a = torch.cat([ref[n].reshape(-1) for n in names])
    b = torch.cat([permute_axes(other[n], spec.axes[n], perms).reshape(-1) for n in names])
    denom = float(a.norm() * b.norm())
    return float(a @ b) / denom if denom > 0 else 0.0


@register_method
class WeightMatching(MergeMethod):
    """Git re-basin weight matching. ``max_iter``: most sweeps over the groups;
    ``seed``: the random group order of each sweep."""

    name = "weight-matching"
    needs_data = False
    description = "git re-basin weight matching: data-free permutations by coordinate descent"
    permutation_only: ClassVar[bool] = True
    parameters = (
        Param("max_iter", int, 100, "most sweeps over the groups", low=1),
        Param("seed", int, 0, "seed of the random group order (model k uses seed + k)"),
    )

    def align(self, ctx: AlignContext) -> Alignment:
        spec, ref_k = ctx.spec, ctx.reference

        def as64(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {n: sd[n].detach().cpu().to(torch.float64) for n in spec.axes}

        ref = as64(ctx.state_dicts[ref_k])
        N = ctx.n_models
        perms: list[Perms | None] = [None] * N
        objectives: list[list[float] | None] = [None] * N
        aligned: list[dict[str, torch.Tensor] | None] = [None] * N
        for k in range(N):
            if k == ref_k:
                continue
            other = as64(ctx.state_dicts[k])
            gen = torch.Generator().manual_seed(self.seed + k)
            perms[k], objectives[k] = weight_match(ref, other, spec, self.max_iter, gen)
            aligned[k] = other
        groups = {}
        for g in spec.groups:
            names = list(dict.fromkeys(n for n, _ in g.members))
            quality = [
                None if p is None else group_cosine(ref, aligned[k], spec, p, names)
                for k, p in enumerate(perms)
            ]
            ga = permutation_group(
                [None if p is None else p[g.name] for p in perms], quality, g.size
            )
            ga.details["objective"] = objectives
            ga.details["sweeps"] = [None if o is None else len(o) - 1 for o in objectives]
            groups[g.name] = ga
        return Alignment(groups)
