"""Remedies for dense (CCA) alignment on narrow networks (docs/cca.md, 'Narrow networks').

* :func:`preactivation_spec`: read each group's features before the nonlinearity
  instead of after it: at the output of its single BatchNorm (conv groups inside
  blocks), or of its single writing Linear/Conv where it has no BatchNorm (MLP
  hidden layers). A residual stream is written by several layers and summed before
  its ReLU: no module outputs its pre-activation, so it keeps its collection point.
* :func:`average_shared_space`: merge in a space between the models instead of the
  reference's: ``A = sum_k w_k U_k``, ``M_k <- A M_k``, ``U_k <- U_k A^-1``. For two
  models under CCA this is the average of the two models' canonical bases (the
  canonical variates mapped back by ``sum_k w_k P_k^-T``).
* :func:`stream_groups` / :func:`replace_groups`: per-group choice of alignment
  (e.g. permutations for residual streams, CCA inside blocks).
* :func:`repair_targets` / :func:`repair_linear`: REPAIR (Jordan et al., 2023) for
  networks without BatchNorm: rescale each merged unit's pre-activation to the mean
  and std that the aligned endpoints' units interpolate to,
  ``mean = sum_k w_k M_k E[z_k]``, ``var = sum_k w_k diag(M_k Cov(z_k) M_k^T)``,
  by folding an affine correction into the writing layer's weight and bias.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from ..io.padding import drop_padded, real_positions
from ..methods.base import Alignment, GroupAlignment
from ..models.spec import FeatureGroup, MergeSpec
from .bn import renorm_targets
from .stats import (
    JointCovariance,
    Statistics,
    centre,
    collect_statistics,
    reduce_accumulators,
    sharded,
)

_WRITERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def writers(group: FeatureGroup, model: nn.Module) -> list[str]:
    """Names of the Linear/Conv modules whose output channels are the group."""
    out = []
    for tensor, axis in group.members:
        if axis != 0 or not tensor.endswith(".weight"):
            continue
        name = tensor[: -len(".weight")]
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(module, _WRITERS):
            out.append(name)
    return out


def stream_groups(spec: MergeSpec, model: nn.Module) -> set[str]:
    """Groups written by more than one layer: residual streams (summed by skip additions)."""
    return {g.name for g in spec.groups if len(writers(g, model)) > 1}


def preactivation_point(group: FeatureGroup, model: nn.Module) -> str | None:
    """The module whose output is the group's pre-activation, or None (residual stream,
    or a group with no single writer)."""
    if len(group.norms) == 1:
        return group.norms[0]
    if not group.norms:
        w = writers(group, model)
        if len(w) == 1:
            return w[0]
    return None


def preactivation_spec(spec: MergeSpec, model: nn.Module) -> tuple[MergeSpec, list[str]]:
    """``spec`` with every group that has a pre-activation module collected at its output;
    returns the names of the groups left where they were."""
    groups, kept = [], []
    for g in spec.groups:
        point = preactivation_point(g, model)
        if point is None:
            kept.append(g.name)
            groups.append(g)
        else:
            groups.append(dataclasses.replace(g, collect_at=point, collect_on="output"))
    return MergeSpec(tuple(groups)), kept


def average_shared_space(
    alignment: Alignment, weights: Sequence[float], groups: Iterable[str] | None = None
) -> Alignment:
    """Move every (or the named) group's shared space from the reference's to
    ``A = sum_k w_k U_k`` applied to it: ``M_k <- A M_k``, ``U_k <- U_k A^-1``."""
    names = set(alignment.groups) if groups is None else set(groups)
    out = {}
    for name, ga in alignment.groups.items():
        if name not in names:
            out[name] = ga
            continue
        A = sum(w * U for w, U in zip(weights, ga.U))
        A_inv = torch.linalg.inv(A)
        out[name] = GroupAlignment(
            M=[A @ M for M in ga.M],
            U=[U @ A_inv for U in ga.U],
            quality=list(ga.quality),
            details={**ga.details, "shared": "average"},
        )
    return Alignment(out)


def replace_groups(base: Alignment, other: Alignment, names: Iterable[str]) -> Alignment:
    """``base`` with the named groups' transforms taken from ``other``."""
    names = set(names)
    return Alignment({g: (other.groups[g] if g in names else a) for g, a in base.groups.items()})


def repair_targets(
    pre_stats: Statistics, alignment: Alignment, weights: Sequence[float]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Group -> target (mean, std) of the merged pre-activation, from statistics collected
    at the pre-activation points (:func:`preactivation_spec`)."""
    out = {}
    for name, jc in pre_stats.groups.items():
        per_model = [_single(jc, k) for k in range(jc.n_models)]
        out[name] = renorm_targets(per_model, alignment.groups[name].M, weights)
    return out


class _single(JointCovariance):
    """Model k's diagonal block of a joint accumulator, as a one-model accumulator."""

    def __init__(self, jc: JointCovariance, k: int) -> None:
        self.n_models, self.d, self.n = 1, jc.d, jc.n
        self._mean, self._cov = jc.mean_of(k), jc.block(k, k)

    def mean_of(self, i: int) -> torch.Tensor:
        return self._mean

    def block(self, i: int, j: int) -> torch.Tensor:
        return self._cov


@torch.no_grad()
def repair_linear(
    model: nn.Module,
    spec: MergeSpec,
    targets: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    batches: Iterable[torch.Tensor] | Sequence[torch.Tensor],
    device: str = "cpu",
) -> int:
    """Fold ``z -> (z - mean) * t_std / std + t_mean`` into each group's single writer
    (groups in spec order, one pass over ``batches`` per group, so each correction sees
    the corrected layers before it). Groups without a single writer or with BatchNorm
    are skipped. Returns the number of groups repaired."""
    batches = list(batches)
    model.eval()
    done = 0
    for g in spec.groups:
        if g.name not in targets or g.norms:
            continue
        w = writers(g, model)
        if len(w) != 1:
            continue
        layer = model.get_submodule(w[0])
        acc = JointCovariance(1, g.size, "cpu")
        axis = -1 if isinstance(layer, nn.Linear) else 1  # a Linear's units: its last axis
        batch: dict[str, torch.Tensor | None] = {"positions": None}  # the batch's real tokens

        def add(_m, _a, out, acc=acc, axis=axis, batch=batch) -> None:
            real = drop_padded(out, batch["positions"]) if axis == -1 else out
            acc.add_batch([centre(real, acc.shift(0), axis)])

        handle = layer.register_forward_hook(add)
        try:
            for x in sharded(batches, [acc]):
                x = x.to(device)
                batch["positions"] = real_positions(x)
                model(x)
        finally:
            handle.remove()
        reduce_accumulators([acc])
        mean, std = acc.mean_of(0), torch.diagonal(acc.block(0, 0)).clamp_min(0).sqrt()
        t_mean, t_std = (t.to(torch.float64) for t in targets[g.name])
        live = std > 1e-8 * float(std.max().clamp_min(1e-300))
        a = torch.where(live, t_std / std.clamp_min(1e-300), torch.ones_like(std))
        shape = (-1,) + (1,) * (layer.weight.ndim - 1)
        layer.weight.mul_(a.to(layer.weight).view(shape))
        if layer.bias is not None:
            b = layer.bias.to(torch.float64).cpu()
            layer.bias.copy_((a * (b - mean) + t_mean).to(layer.bias))
        done += 1
    return done


# Pre-activation statistics of the input models, kept for the latest (models, data) pair
# so that trying several candidates (automatic selection) gathers them once.
_PRE_CACHE: dict[str, tuple[list, Statistics]] = {}


def _preactivation_statistics(loaded, calib, batch_size: int, device: str) -> Statistics | None:

    keys = [calib.x, *loaded.state_dicts[0].values()]
    hit = _PRE_CACHE.get("latest")
    if hit is not None and len(hit[0]) == len(keys) and all(r() is k for r, k in zip(hit[0], keys)):
        return hit[1]
    models = [loaded.build(sd, device) for sd in loaded.state_dicts]
    pre_spec, _ = preactivation_spec(loaded.spec, models[0])
    groups = tuple(g for g in pre_spec.groups if not g.norms and len(writers(g, models[0])) == 1)
    if not groups:
        return None
    stats = collect_statistics(
        models, MergeSpec(groups), calib.batches(batch_size), device, norm_stats=False
    )
    _PRE_CACHE["latest"] = ([weakref.ref(k) for k in keys], stats)
    return stats


def repair_merged(
    model: nn.Module,
    loaded,
    alignment: Alignment,
    weights: Sequence[float],
    calib,
    batch_size: int,
    device: str = "cpu",
) -> int:
    """REPAIR a merged network without BatchNorm in place: gather (once per models and
    data) the input models' pre-activation statistics, then :func:`repair_linear`.
    Returns the number of layers renormalised."""
    pre = _preactivation_statistics(loaded, calib, batch_size, device)
    if pre is None:
        return 0
    targets = repair_targets(pre, alignment, weights)
    return repair_linear(model, loaded.spec, targets, list(calib.batches(batch_size)), device)
