"""Streaming joint statistics of the N models' features on calibration data.

For each feature group the features of all N models are concatenated sample
by sample into z_t (length N*d) and accumulated in float64: ``n``, the sum and
the sum of outer products of z_t (docs/cca.md, 'Statistics'), both taken
about a fixed shift for accuracy. Memory is O((N d)^2) per group whatever the
number of samples; activations of one batch are the only ones held at a time.
:class:`PairwiseCovariance` keeps only the blocks with one reference model,
O(N d^2) per group, for when the joint statistics would not fit
(``statistics_bytes`` gives both sizes).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..io.padding import drop_padded, real_positions
from ..models.spec import FeatureGroup, MergeSpec
from ..runtime import distributed
from ..runtime.errors import NumericalError, OptionError, SpecError

_F32_SAFE = 0.5 * torch.finfo(torch.float32).max


class JointCovariance:
    """Streaming float64 mean and covariance of concatenated features.

    ``update(Z)`` takes a (rows, N*d) matrix; ``cov`` is the biased (1/n)
    covariance of shape (N*d, N*d); ``block(i, j)`` its d x d block between
    model i and model j; ``mean`` the mean.

    The sums are taken about a fixed shift ``c``, the first batch's mean:
    ``e = sum (z - c)`` and ``Q = sum (z - c)(z - c)^T``, so that
    ``mean = c + e/n`` and ``cov = Q/n - (e/n)(e/n)^T``. Later batches are centred
    on ``c`` too (:meth:`shift`), which keeps their float32 products accurate
    and makes adding a batch a plain sum. Only the blocks ``Q_ij`` with
    ``i <= j`` are stored; the others are their transposes.
    """

    def __init__(self, n_models: int, d: int, device: torch.device | str = "cpu") -> None:
        self.n_models, self.d = n_models, d
        self.n = 0
        self.has_shift = False
        self.c = torch.zeros(n_models * d, dtype=torch.float64, device=device)
        self.e = torch.zeros(n_models * d, dtype=torch.float64, device=device)
        self.Q = torch.zeros(n_models * d, n_models * d, dtype=torch.float64, device=device)

    @property
    def nbytes(self) -> int:
        """Bytes held by the accumulator."""
        return self.c.nbytes + self.e.nbytes + self.Q.nbytes

    def _rows(self, k: int) -> slice:
        return slice(k * self.d, (k + 1) * self.d)

    def shift(self, k: int) -> torch.Tensor | None:
        """What to centre model ``k``'s next batch on (:func:`centre`): the shift
        ``c``, or None (the batch's own mean) before the first batch."""
        return self.c[self._rows(k)] if self.has_shift else None

    def set_shift(self, c: torch.Tensor) -> None:
        """Centre every batch, the first included, on ``c`` (before any batch)."""
        self.c.copy_(c)
        self.has_shift = True

    def update(self, Z: torch.Tensor) -> None:
        if Z.ndim != 2 or Z.shape[1] != self.n_models * self.d:
            raise ValueError(f"expected (rows, {self.n_models * self.d}), got {tuple(Z.shape)}")
        self.add_batch([centre(z, self.shift(k)) for k, z in enumerate(Z.split(self.d, 1))])

    def add_batch(
        self,
        parts: Sequence[CentredBatch],
        check: Callable[[torch.Tensor], None] | None = None,
    ) -> None:
        """Add one batch given as each model's :func:`centre`-d activations (N parts).

        Products are formed in the activations' precision (float32) and added in
        float64. Parts centred on :meth:`shift` add their products as they are;
        parts centred elsewhere (on ``m``) are moved to the shift exactly, with
        ``delta = m - c``: ``Q_ij += G_ij + e_i delta_j^T + delta_i e_j^T + n delta_i delta_j^T``.
        A batch whose products overflow float32 is recomputed in float64. ``check``
        first sees the models' centred sums (non-finite iff an activation is)."""
        if len(parts) != self.n_models or any(p.Z.shape[0] != self.d for p in parts):
            raise ValueError(f"expected {self.n_models} parts of {self.d} features")
        sums = [p.Z.sum(1) for p in parts]
        if check is not None:
            check(torch.cat(sums))
        n, dev = parts[0].n, self.Q.device
        m = torch.cat([p.m.to(dev, torch.float64) for p in parts])
        if not self.has_shift:
            self.set_shift(m)
        delta = m - self.c
        e = torch.cat([s.to(dev, torch.float64) for s in sums])
        moved = bool(delta.any())  # False when the parts were centred on the shift
        for (i, j), G in self._grams(parts).items():
            if moved:
                G = G.to(dev, torch.float64) + self._moved(e, delta, n, i, j)
            self._add_block(i, j, G.to(dev))
        self.n += n
        self.e += e + n * delta

    def _grams(self, parts: Sequence[CentredBatch]) -> dict[tuple[int, int], torch.Tensor]:
        """This batch's products ``Z_i Z_j^T`` for the stored blocks, diagonal ones first.
        By Cauchy-Schwarz no entry of a block exceeds the largest diagonal entry of the
        diagonal blocks, so those diagonals alone tell whether float32 was enough."""
        blocks = sorted(self._blocks(), key=lambda b: b[0] != b[1])
        grams: dict[tuple[int, int], torch.Tensor] = {}
        for i, j in blocks:
            G = gram(parts[i].Z, parts[j].Z)
            if i == j and not bool(torch.diagonal(G).max() < _F32_SAFE):  # may overflow
                Zs = [p.Z.double() for p in parts]
                return {(i, j): gram(Zs[i], Zs[j]) for i, j in blocks}
            grams[i, j] = G
        return grams

    def _moved(self, e: torch.Tensor, delta: torch.Tensor, n: int, i: int, j: int) -> torch.Tensor:
        """Block (i, j) of the change in ``Q`` when sums ``e`` of ``n`` rows taken about
        ``c + delta`` are moved to ``c``."""
        a, b = self._rows(i), self._rows(j)
        return (
            torch.outer(e[a], delta[b])
            + torch.outer(delta[a], e[b])
            + n * torch.outer(delta[a], delta[b])
        )

    def _blocks(self) -> list[tuple[int, int]]:
        """The (i, j) blocks of ``Q`` that are stored (``i <= j``)."""
        N = self.n_models
        return [(i, j) for i in range(N) for j in range(i, N)]

    def _add_block(self, i: int, j: int, G: torch.Tensor) -> None:
        self.Q[self._rows(i), self._rows(j)] += G

    def _Q(self, i: int, j: int) -> torch.Tensor:
        """Sum of the shifted products between models i and j, (d, d)."""
        if i <= j:
            return self.Q[self._rows(i), self._rows(j)]
        return self.Q[self._rows(j), self._rows(i)].T

    def merge(self, other: JointCovariance) -> None:
        """Add another accumulator's samples (same shape and kind) to this one."""
        if other.n == 0:
            return
        if not self.has_shift:
            self.set_shift(other.c)
        delta = other.c.to(self.c.device) - self.c
        e = other.e.to(self.c.device)
        for i, j in self._blocks():
            moved = other._Q(i, j).to(self.c.device) + self._moved(e, delta, other.n, i, j)
            self._add_block(i, j, moved)
        self.e += e + other.n * delta
        self.n += other.n

    @property
    def mean(self) -> torch.Tensor:
        return self.c + self.e / max(self.n, 1)

    def mean_of(self, i: int) -> torch.Tensor:
        return self.mean[self._rows(i)]

    @property
    def cov(self) -> torch.Tensor:
        N, n = self.n_models, max(self.n, 1)
        Q = torch.cat([torch.cat([self._Q(i, j) for j in range(N)], 1) for i in range(N)])
        e = self.e / n
        C = Q / n - torch.outer(e, e)
        return (C + C.T) / 2

    def block(self, i: int, j: int) -> torch.Tensor:
        """The (d, d) block ``C_ij`` of ``cov``."""
        e = self.e / max(self.n, 1)
        C = self._Q(i, j) / max(self.n, 1) - torch.outer(e[self._rows(i)], e[self._rows(j)])
        return (C + C.T) / 2 if i == j else C


class PairwiseCovariance(JointCovariance):
    """The blocks of a joint covariance that alignment to one reference needs.

    Same interface as :class:`JointCovariance`, but only the diagonal blocks
    (``Q[0, k]``) and those with the reference (``Q[1, k]``, between the reference
    and model k) are kept: ``Q`` has shape (2, N, d, d), i.e.
    ``8 * (2 N d^2 + 2 N d)`` bytes instead of ``8 * ((N d)^2 + 2 N d)``.
    ``block(i, j)`` answers the diagonal blocks and those with the reference;
    any other block (and the full ``cov``) raises :class:`OptionError`.
    """

    def __init__(
        self, n_models: int, d: int, reference: int = 0, device: torch.device | str = "cpu"
    ) -> None:
        self.n_models, self.d, self.reference = n_models, d, reference
        self.n = 0
        self.has_shift = False
        self.c = torch.zeros(n_models * d, dtype=torch.float64, device=device)
        self.e = torch.zeros(n_models * d, dtype=torch.float64, device=device)
        self.Q = torch.zeros(2, n_models, d, d, dtype=torch.float64, device=device)

    def _blocks(self) -> list[tuple[int, int]]:
        ref = self.reference
        return [(k, k) for k in range(self.n_models)] + [
            (ref, k) for k in range(self.n_models) if k != ref
        ]

    def _add_block(self, i: int, j: int, G: torch.Tensor) -> None:
        self.Q[0 if i == j else 1, j] += G

    def _Q(self, i: int, j: int) -> torch.Tensor:
        ref = self.reference
        if i == j:
            return self.Q[0, i]
        if i == ref:
            return self.Q[1, j]
        if j == ref:
            return self.Q[1, i].T
        raise OptionError(
            f"pairwise statistics hold no block between models {i} and {j} "
            f"(only blocks with the reference, model {ref})"
        )

    @property
    def cov(self) -> torch.Tensor:
        raise OptionError(
            "pairwise statistics hold only the blocks with the reference, not the full covariance"
        )


STATS_MODES = ("auto", "joint", "pairwise")


def statistics_bytes(spec: MergeSpec, n_models: int, mode: str, norm_stats: bool = True) -> int:
    """float64 bytes held by the accumulators of one statistics pass.

    Per group of width d: joint ``8 ((N d)^2 + 2 N d)``, pairwise ``8 (2 N d^2 + 2 N d)``;
    plus, with ``norm_stats``, ``8 N (d^2 + 2 d)`` per BatchNorm on the group."""
    N, total = n_models, 0
    for g in spec.groups:
        d = g.size
        total += 8 * ((N * d) ** 2 if mode == "joint" else 2 * N * d * d) + 16 * N * d
        if norm_stats:
            total += len(g.norms) * 8 * N * (d * d + 2 * d)
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


def gram(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T`` for (d, n) matrices. On the CPU the product goes through numpy,
    whose BLAS computes ``a @ a.T`` (``b is a``) as a symmetric rank-k update: half
    the multiplications of a general product (measured: 1.6-2x faster than torch's
    ``a @ a.T`` on one core for d = 16..2048; cross blocks ``a @ b.T`` 0-15% faster)."""
    if a.device.type != "cpu" or a.requires_grad or b.requires_grad:
        return a @ b.T
    an = a.numpy()
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is checked by the caller
        return torch.from_numpy(an @ (an if b is a else b.numpy()).T)


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


def centre(x: torch.Tensor, shift: torch.Tensor | None = None, axis: int = 1) -> CentredBatch:
    """(B, d) or (B, d, *spatial) activations -> :class:`CentredBatch`, centred on
    ``shift`` (d,) or, when it is None, on the batch mean. ``axis=-1``: the units are
    the last axis, (B, *positions, d) (a Linear applied at every position).

    The accumulators pass their running mean as ``shift`` (after the first batch):
    close enough to every batch's mean for accurate float32 products, and it saves a
    pass over the activations. Every spatial position is a sample (as in
    :func:`features_as_rows`). One copy
    of the batch, never a view of ``x``, so later in-place ops (``ReLU(inplace=True)``,
    ``out += ...``) do not change it. Precision: float64 for (B, d) activations (B rows:
    cheap, and the statistics do not depend on the batch size beyond float64 rounding);
    ``x``'s own but at least float32 for spatial ones, whose B*H*W rows made float64
    products most of the statistics pass (measured on a ResNet20: half the CPU time;
    the covariances then agree with the float64 ones to ~1e-6 relative)."""
    if x.ndim < 2:
        raise SpecError(f"activation of shape {tuple(x.shape)} has no feature axis")
    if axis == -1:
        x = x.movedim(-1, 1)
    B, d = x.shape[:2]
    f = x.reshape(B, d, -1)
    dtype = torch.float64 if x.ndim == 2 else torch.promote_types(x.dtype, torch.float32)
    f = f.to(dtype)
    n = B * f.shape[2]
    m = f.sum((0, 2)) / max(n, 1) if shift is None else shift.to(x.device, dtype)
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

    def hook(_m: nn.Module, _args: object, out: torch.Tensor) -> None:
        store(out)

    hook.statistics_output = True  # type: ignore[attr-defined]  # see EndpointOutputs
    return module.register_forward_hook(hook)


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
    forward: Callable[[int, nn.Module, torch.Tensor], None] | None = None,
) -> Statistics:
    """Run every model on the same batches and accumulate each group's statistics.

    ``forward(k, model, x)`` runs model k on a batch (default ``model(x)``; the models
    in order on every batch), e.g. to keep outputs for a later step.

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
    batch: dict[str, torch.Tensor | None] = {"positions": None}  # the batch's real tokens

    def storer(key: tuple[str, int], g: FeatureGroup):
        def store(x: torch.Tensor) -> None:
            if g.collect_from is not None:  # units of a fused projection's output
                x = x.narrow(g.collect_axis, g.collect_from, g.size)
            if g.collect_axis == -1:  # per-position units: padded positions left out
                x = drop_padded(x, batch["positions"])
            # a copy: later in-place ops cannot change it
            current[key] = centre(x.detach(), stats.groups[key[0]].shift(key[1]), g.collect_axis)

        return store

    reached: set[tuple[str, int]] = set()

    def norm_updater(bn: str, k: int):
        # per-model statistics need no other model: accumulate at once, keep nothing
        def update(x: torch.Tensor) -> None:
            where = f"{bn} (output)"
            acc = stats.norms[bn][k]
            acc.add_batch([centre(x.detach(), acc.shift(0))], lambda v: _check_finite(v, where))
            reached.add((bn, k))

        return update

    accumulators = [*stats.groups.values(), *(a for per in stats.norms.values() for a in per)]
    try:
        for k, model in enumerate(models):
            model.eval()
            for g in groups:
                store = storer((g.name, k), g)
                handles.append(_hook_point(model, g.collect_at, g.collect_on, store))
            for bn in bns:
                handles.append(_hook_point(model, bn, "output", norm_updater(bn, k)))
        for x in sharded(batches, accumulators):
            x = x.to(device)
            batch["positions"] = real_positions(x)
            for k, model in enumerate(models):
                if forward is None:
                    model(x)
                else:
                    forward(k, model, x)
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
    stats.num_samples = reduce_accumulators(accumulators, stats.num_samples)
    return stats


def sharded(
    batches: Iterable[torch.Tensor], accumulators: Sequence[JointCovariance]
) -> Iterable[torch.Tensor]:
    """This process's share of ``batches`` (:func:`ccamerge.runtime.distributed.shard`) for a pass
    that feeds ``accumulators``: their shift is rank 0's, set by batch 0 and shared before
    any other rank adds a batch, so that every batch is centred (and its float32 products
    rounded) exactly as in one process. Without distribution: ``batches``."""
    return distributed.shard(batches, lambda: _share_shifts(accumulators))


def _share_shifts(accumulators: Sequence[JointCovariance]) -> None:
    if not accumulators:
        return
    c = torch.cat([a.c for a in accumulators])
    distributed.broadcast_([c])
    for a, part in zip(accumulators, c.split([a.c.numel() for a in accumulators])):
        a.set_shift(part)


def reduce_accumulators(accumulators: Sequence[JointCovariance], samples: int = 0) -> int:
    """After a :func:`sharded` pass: add every rank's sums (``n``, ``e``, ``Q``, all about
    the shared shift) in float64, so that each accumulator holds all the batches on every
    rank; returns ``samples`` summed likewise. Without distribution: nothing, ``samples``."""
    if not distributed.is_distributed():
        return samples
    counts = torch.tensor(
        [float(samples)] + [float(a.n) for a in accumulators], dtype=torch.float64
    )
    distributed.all_reduce_sum([counts, *(t for a in accumulators for t in (a.e, a.Q))])
    for a, n in zip(accumulators, counts[1:].tolist()):
        a.n = int(n)
    return int(counts[0])


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
