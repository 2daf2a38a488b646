"""Streaming joint statistics of the N models' features on calibration data.

For each feature group the features of all N models are concatenated sample
by sample into z_t (length N*d) and accumulated in float64 as
``n``, ``s = sum z_t`` and ``Q = sum z_t z_t^T`` (cca-merge-math.md, section
3). Memory is O((N d)^2) per group whatever the number of samples; activations
of one batch are the only ones held at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import NumericalError, SpecError
from .spec import MergeSpec


class JointCovariance:
    """Streaming float64 mean and covariance of concatenated features.

    ``update(Z)`` takes a (rows, N*d) matrix; ``cov`` is the biased (1/n)
    covariance ``Q/n - mean mean^T`` of shape (N*d, N*d); ``block(i, j)`` its
    d x d block between model i and model j.
    """

    def __init__(self, n_models: int, d: int, device: torch.device | str = "cpu") -> None:
        self.n_models, self.d = n_models, d
        self.n = 0
        self.s = torch.zeros(n_models * d, dtype=torch.float64, device=device)
        self.Q = torch.zeros(n_models * d, n_models * d, dtype=torch.float64, device=device)

    def update(self, Z: torch.Tensor) -> None:
        if Z.ndim != 2 or Z.shape[1] != self.n_models * self.d:
            raise ValueError(f"expected (rows, {self.n_models * self.d}), got {tuple(Z.shape)}")
        Z = Z.to(self.Q.device, torch.float64)
        self.n += Z.shape[0]
        self.s += Z.sum(0)
        self.Q.addmm_(Z.T, Z)

    def merge(self, other: JointCovariance) -> None:
        """Add another accumulator's samples (same shape) to this one."""
        self.n += other.n
        self.s += other.s.to(self.s.device)
        self.Q += other.Q.to(self.Q.device)

    @property
    def mean(self) -> torch.Tensor:
        return self.s / max(self.n, 1)

    @property
    def cov(self) -> torch.Tensor:
        mu = self.mean
        C = self.Q / max(self.n, 1) - torch.outer(mu, mu)
        return (C + C.T) / 2

    def block(self, i: int, j: int) -> torch.Tensor:
        d = self.d
        return self.cov[i * d : (i + 1) * d, j * d : (j + 1) * d]

    def mean_of(self, i: int) -> torch.Tensor:
        return self.mean[i * self.d : (i + 1) * self.d]


def features_as_rows(x: torch.Tensor) -> torch.Tensor:
    """(B, C) -> (B, C); (B, C, H, W, ...) -> (B*H*W*..., C): every position is a sample."""
    if x.ndim == 2:
        return x
    if x.ndim < 2:
        raise SpecError(f"activation of shape {tuple(x.shape)} has no feature axis")
    return torch.movedim(x, 1, -1).reshape(-1, x.shape[1])


@dataclass
class Statistics:
    """What one pass over calibration data gives the merge methods.

    ``groups[g]`` is the joint accumulator of group g over all models;
    ``norms[bn][k]`` the accumulator (one model) of BatchNorm ``bn``'s output in
    model k, used to renormalise merged BatchNorms.
    """

    groups: dict[str, JointCovariance]
    norms: dict[str, list[JointCovariance]] = field(default_factory=dict)
    num_samples: int = 0


def _hook_point(model: nn.Module, module_name: str, on: str, store: Callable[[torch.Tensor], None]):
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        raise SpecError(f"collection point {module_name!r} is not a module of the model") from None
    if on == "input":
        return module.register_forward_pre_hook(lambda _m, args: store(args[0]))
    return module.register_forward_hook(lambda _m, _a, out: store(out))


@torch.no_grad()
def collect_statistics(
    models: Sequence[nn.Module],
    spec: MergeSpec,
    batches: Iterable[torch.Tensor],
    device: torch.device | str = "cpu",
    norm_stats: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> Statistics:
    """Run every model on the same batches and accumulate each group's statistics.

    Models are run in eval mode. Raises :class:`NumericalError` naming the
    collection point when an activation is not finite.
    """
    N = len(models)
    stats = Statistics(
        groups={g.name: JointCovariance(N, g.size, device) for g in spec.groups},
    )
    bns = [bn for g in spec.groups for bn in g.norms] if norm_stats else []
    sizes = {bn: g.size for g in spec.groups for bn in g.norms}
    stats.norms = {bn: [JointCovariance(1, sizes[bn], device) for _ in range(N)] for bn in bns}

    current: dict[tuple[str, int], torch.Tensor] = {}
    handles = []

    def storer(key: tuple[str, int]):
        def store(x: torch.Tensor) -> None:
            rows = features_as_rows(x.detach())
            # copy a view, or a later in-place op (ReLU(inplace=True), out += ...) changes it
            shared = rows.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
            current[key] = rows.clone() if shared else rows

        return store

    try:
        for k, model in enumerate(models):
            model.eval()
            for g in spec.groups:
                handles.append(_hook_point(model, g.collect_at, g.collect_on, storer((g.name, k))))
            for bn in bns:
                handles.append(_hook_point(model, bn, "output", storer((bn, k))))
        for x in batches:
            x = x.to(device)
            for model in models:
                model(x)
            for g in spec.groups:
                Z = torch.cat([_take(current, (g.name, k), g.collect_at) for k in range(N)], 1)
                _check_finite(Z, f"{g.collect_at} ({g.collect_on} of group {g.name})")
                stats.groups[g.name].update(Z)
            for bn in bns:
                for k in range(N):
                    Z = _take(current, (bn, k), bn)
                    _check_finite(Z, f"{bn} (output)")
                    stats.norms[bn][k].update(Z)
            stats.num_samples += x.shape[0]
            if on_batch is not None:
                on_batch(x.shape[0])
    finally:
        for h in handles:
            h.remove()
    return stats


def _take(current: dict, key: tuple[str, int], where: str) -> torch.Tensor:
    if key not in current:
        raise SpecError(f"collection point {where!r} was not reached in the forward pass")
    return current.pop(key)


def _check_finite(Z: torch.Tensor, where: str) -> None:
    if not torch.isfinite(Z).all():
        raise NumericalError(
            f"non-finite activations at {where}: the models overflow on this data "
            "(check the input scaling and the checkpoints)"
        )
