"""Streaming joint statistics of the N models' features on calibration data.

For each feature group the features of all N models are concatenated sample
by sample into z_t (length N*d) and accumulated in float64 as
``n``, ``s = sum z_t`` and ``Q = sum z_t z_t^T`` (cca-merge-math.md, section
3). Memory is O((N d)^2) per group whatever the number of samples; activations
of one batch are the only ones held at a time. :class:`PairwiseCovariance`
keeps only the blocks with one reference model, O(N d^2) per group, for when
the joint statistics would not fit (``statistics_bytes`` gives both sizes).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import NumericalError, OptionError, SpecError
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
        self.add_batch([centre(z) for z in Z.split(self.d, 1)])

    def add_batch(
        self,
        parts: Sequence[CentredBatch],
        check: Callable[[torch.Tensor], None] | None = None,
    ) -> None:
        """Add one batch given as each model's :func:`centre`-d activations (N parts).

        Products are formed in the activations' precision (float32) from centred
        values and added in float64: with shifts ``m_i``, centred sums ``e_i`` and
        centred products ``G_ij = Z_i Z_j^T`` of the batch's ``n`` rows,
        ``Q_ij += G_ij + e_i m_j^T + m_i e_j^T + n m_i m_j^T`` (exact, since
        ``Z = x - m``). Centring keeps the float32 products accurate whatever the
        mean; a block that overflows float32 is recomputed in float64. ``check``
        first sees the models' batch means (non-finite iff an activation is)."""
        if len(parts) != self.n_models or any(p.Z.shape[0] != self.d for p in parts):
            raise ValueError(f"expected {self.n_models} parts of {self.d} features")
        if check is not None:
            check(torch.cat([p.m for p in parts]))
        n, dev = parts[0].n, self.Q.device
        ms = [p.m.to(dev, torch.float64) for p in parts]
        es = [p.Z.sum(1).to(dev, torch.float64) for p in parts]
        for i, j in self._blocks():
            G = parts[i].Z @ parts[j].Z.T
            if not torch.isfinite(G).all():  # huge but finite activations
                G = parts[i].Z.double() @ parts[j].Z.double().T
            G = G.to(dev, torch.float64)
            G += (
                torch.outer(es[i], ms[j])
                + torch.outer(ms[i], es[j])
                + n * torch.outer(ms[i], ms[j])
            )
            self._add_block(i, j, G)
        self.n += n
        self.s += torch.cat([e + n * m for e, m in zip(es, ms)])

    def _blocks(self) -> list[tuple[int, int]]:
        """The (i, j) blocks of ``Q`` that ``add_batch`` computes (``i <= j``)."""
        N = self.n_models
        return [(i, j) for i in range(N) for j in range(i, N)]

    def _add_block(self, i: int, j: int, G: torch.Tensor) -> None:
        d = self.d
        self.Q[i * d : (i + 1) * d, j * d : (j + 1) * d] += G
        if i != j:
            self.Q[j * d : (j + 1) * d, i * d : (i + 1) * d] += G.T

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
        """The (d, d) block ``C_ij`` of ``cov``, computed from Q's slices alone."""
        d, n = self.d, max(self.n, 1)
        a, b = slice(i * d, (i + 1) * d), slice(j * d, (j + 1) * d)
        mu = self.mean
        C_ij = self.Q[a, b] / n - torch.outer(mu[a], mu[b])
        C_ji = self.Q[b, a] / n - torch.outer(mu[b], mu[a])
        return (C_ij + C_ji.T) / 2

    def mean_of(self, i: int) -> torch.Tensor:
        return self.mean[i * self.d : (i + 1) * self.d]


class PairwiseCovariance(JointCovariance):
    """The blocks of a joint covariance that alignment to one reference needs.

    Same interface as :class:`JointCovariance` (``update`` takes the (rows, N*d)
    concatenated features), but only ``Q[0, k] = sum z_k z_k^T`` and
    ``Q[1, k] = sum z_ref z_k^T`` are kept: ``Q`` has shape (2, N, d, d), i.e.
    ``8 * (2 N d^2 + N d)`` bytes instead of ``8 * ((N d)^2 + N d)``.
    ``block(i, j)`` answers the diagonal blocks and those with the reference;
    any other block (and the full ``cov``) raises :class:`OptionError`.
    """

    def __init__(
        self, n_models: int, d: int, reference: int = 0, device: torch.device | str = "cpu"
    ) -> None:
        self.n_models, self.d, self.reference = n_models, d, reference
        self.n = 0
        self.s = torch.zeros(n_models * d, dtype=torch.float64, device=device)
        self.Q = torch.zeros(2, n_models, d, d, dtype=torch.float64, device=device)

    def update(self, Z: torch.Tensor) -> None:
        if Z.ndim != 2 or Z.shape[1] != self.n_models * self.d:
            raise ValueError(f"expected (rows, {self.n_models * self.d}), got {tuple(Z.shape)}")
        Z = Z.to(self.Q.device, torch.float64)
        self.n += Z.shape[0]
        self.s += Z.sum(0)
        parts = Z.split(self.d, dim=1)
        for k, z in enumerate(parts):
            self.Q[0, k].addmm_(z.T, z)
            if k != self.reference:
                self.Q[1, k].addmm_(parts[self.reference].T, z)

    def _blocks(self) -> list[tuple[int, int]]:
        ref = self.reference
        return [(k, k) for k in range(self.n_models)] + [
            (ref, k) for k in range(self.n_models) if k != ref
        ]

    def _add_block(self, i: int, j: int, G: torch.Tensor) -> None:
        self.Q[0 if i == j else 1, j] += G

    @property
    def cov(self) -> torch.Tensor:
        raise OptionError(
            "pairwise statistics hold only the blocks with the reference, not the full covariance"
        )

    def block(self, i: int, j: int) -> torch.Tensor:
        n, ref = max(self.n, 1), self.reference
        mu_i, mu_j = self.mean_of(i), self.mean_of(j)
        if i == j:
            C = self.Q[0, i] / n - torch.outer(mu_i, mu_i)
            return (C + C.T) / 2
        if i == ref:
            return self.Q[1, j] / n - torch.outer(mu_i, mu_j)
        if j == ref:
            return (self.Q[1, i] / n - torch.outer(mu_j, mu_i)).T
        raise OptionError(
            f"pairwise statistics hold no block between models {i} and {j} "
            f"(only blocks with the reference, model {ref})"
        )


STATS_MODES = ("auto", "joint", "pairwise")


def statistics_bytes(spec: MergeSpec, n_models: int, mode: str, norm_stats: bool = True) -> int:
    """float64 bytes held by the accumulators of one statistics pass.

    Per group of width d: joint ``8 ((N d)^2 + N d)``, pairwise ``8 (2 N d^2 + N d)``;
    plus, with ``norm_stats``, ``8 N (d^2 + d)`` per BatchNorm on the group."""
    N, total = n_models, 0
    for g in spec.groups:
        d = g.size
        total += 8 * ((N * d) ** 2 if mode == "joint" else 2 * N * d * d) + 8 * N * d
        if norm_stats:
            total += len(g.norms) * 8 * N * (d * d + d)
    return total


def available_memory() -> int | None:
    """Bytes of RAM available now (``MemAvailable`` of /proc/meminfo, else sysconf)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def features_as_rows(x: torch.Tensor) -> torch.Tensor:
    """(B, C) -> (B, C); (B, C, H, W, ...) -> (B*H*W*..., C): every position is a sample."""
    if x.ndim == 2:
        return x
    if x.ndim < 2:
        raise SpecError(f"activation of shape {tuple(x.shape)} has no feature axis")
    return torch.movedim(x, 1, -1).reshape(-1, x.shape[1])


@dataclass
class CentredBatch:
    """One model's activations of one batch, channel-major and centred:
    ``Z`` (d, n) = features - ``m`` (d,), ``n`` rows (samples x positions)."""

    Z: torch.Tensor
    m: torch.Tensor
    n: int


def centre(x: torch.Tensor) -> CentredBatch:
    """(B, d) or (B, d, *spatial) activations -> :class:`CentredBatch` on the batch mean.

    Every spatial position is a sample (as in :func:`features_as_rows`). One copy
    of the batch, never a view of ``x``, so later in-place ops (``ReLU(inplace=True)``,
    ``out += ...``) do not change it. Precision: float64 for (B, d) activations (B rows:
    cheap, and the statistics do not depend on the batch size beyond float64 rounding);
    ``x``'s own but at least float32 for spatial ones, whose B*H*W rows made float64
    products most of the statistics pass (measured on a ResNet20: half the CPU time;
    the covariances then agree with the float64 ones to ~1e-6 relative)."""
    if x.ndim < 2:
        raise SpecError(f"activation of shape {tuple(x.shape)} has no feature axis")
    B, d = x.shape[:2]
    f = x.reshape(B, d, -1)
    dtype = torch.float64 if x.ndim == 2 else torch.promote_types(x.dtype, torch.float32)
    f = f.to(dtype)
    n = B * f.shape[2]
    m = f.sum((0, 2)) / max(n, 1)
    Z = torch.empty((d, B, f.shape[2]), dtype=dtype, device=x.device)
    torch.sub(f.transpose(0, 1), m[:, None, None], out=Z)
    return CentredBatch(Z.view(d, n), m, n)


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
    pairwise: bool = False,
    reference: int = 0,
    group_stats: bool = True,
) -> Statistics:
    """Run every model on the same batches and accumulate each group's statistics.

    ``pairwise``: keep only the blocks with model ``reference``
    (:class:`PairwiseCovariance`) instead of the full joint covariance;
    ``group_stats=False``: only the BatchNorm outputs (``norm_stats``).
    Models are run in eval mode. Raises :class:`NumericalError` naming the
    collection point when an activation is not finite.
    """
    N = len(models)
    groups = spec.groups if group_stats else ()
    stats = Statistics(
        groups={
            g.name: PairwiseCovariance(N, g.size, reference, device)
            if pairwise
            else JointCovariance(N, g.size, device)
            for g in groups
        },
    )
    bns = [bn for g in spec.groups for bn in g.norms] if norm_stats else []
    sizes = {bn: g.size for g in spec.groups for bn in g.norms}
    stats.norms = {bn: [JointCovariance(1, sizes[bn], device) for _ in range(N)] for bn in bns}

    current: dict[tuple[str, int], torch.Tensor] = {}
    handles = []

    def storer(key: tuple[str, int]):
        def store(x: torch.Tensor) -> None:
            current[key] = centre(x.detach())  # a copy: later in-place ops cannot change it

        return store

    reached: set[tuple[str, int]] = set()

    def norm_updater(bn: str, k: int):
        # per-model statistics need no other model: accumulate at once, keep nothing
        def update(x: torch.Tensor) -> None:
            where = f"{bn} (output)"
            stats.norms[bn][k].add_batch([centre(x.detach())], lambda v: _check_finite(v, where))
            reached.add((bn, k))

        return update

    try:
        for k, model in enumerate(models):
            model.eval()
            for g in groups:
                handles.append(_hook_point(model, g.collect_at, g.collect_on, storer((g.name, k))))
            for bn in bns:
                handles.append(_hook_point(model, bn, "output", norm_updater(bn, k)))
        for x in batches:
            x = x.to(device)
            for model in models:
                model(x)
            for g in groups:
                parts = [_take(current, (g.name, k), g.collect_at) for k in range(N)]
                where = f"{g.collect_at} ({g.collect_on} of group {g.name})"
                stats.groups[g.name].add_batch(parts, lambda v, w=where: _check_finite(v, w))
            for bn in bns:
                for k in range(N):
                    if (bn, k) not in reached:
                        _take(current, (bn, k), bn)  # raises: the point was not reached
            reached.clear()
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
