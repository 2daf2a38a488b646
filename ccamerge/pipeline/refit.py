"""Step 5, refit: sequential least-squares refit of the assembled merge (docs/refit.md).

After alignment and averaging, every ``nn.Linear`` and ``nn.Conv2d`` of the
merged network is refitted in forward order, in closed form, on unlabelled
calibration data. Layer L, fed with the *merged* network's own inputs x (every
earlier layer already refitted), is fitted to the merge-weighted mean of the
endpoints' outputs mapped into the shared space,

    t = sum_k w_k M_k^a z_k        (a: L's output group; M = I without one),

by ridge regression towards the averaged weights W0 (a folded BatchNorm with the
running statistics a reset on the merged inputs would measure, read off G):

    W^T = (G + lam I)^-1 (R + lam W0^T),  G = sum x x^T,  R = sum x t^T,
    lam = ridge * trace(G) / p.

A BatchNorm that is the layer's only reader is folded into the fit (the target
is read at its output); afterwards the layer gets W and the BatchNorm the true
running statistics of W x with ``weight = sqrt(var + eps)``, ``bias = b + mean``,
so that in eval mode the pair computes W x + b exactly. When the comparison
point's only reader is a residual ``add`` whose other summand the merged network
has already computed, the target is read at the sum and that summand is
subtracted. BatchNorms that no refitted layer feeds get honest running
statistics of their merged inputs, as a BatchNorm reset would measure them.

The network is traced once with ``torch.fx`` (the tracer of feature-group discovery:
a submodule that cannot be traced is an opaque leaf whose layers keep their averaged
weights and whose BatchNorms are reset); its nodes are executed one by one
for the merged network and for every endpoint on every calibration chunk.
"stored" mode keeps every chunk's live values between layers (N + 1 forward
passes in all); "recompute" mode, used when those would exceed the memory
budget, runs every chunk afresh through the already refitted prefix for each
layer.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..io.files import Dataset
from ..maths.bn import has_batchnorm, reset_batchnorm
from ..maths.stats import Statistics, available_memory, gram
from ..methods.base import Alignment
from ..models.discover import trace
from ..models.spec import MergeSpec
from ..runtime import distributed
from ..runtime.errors import DataError, OptionError, RefitError, SpecError
from .assemble import assemble, build_merged, state_of
from .load import LoadedModels, Progress, Timer
from .statistics import gather_statistics, needs_norm_statistics

DEFAULT_RIDGE = 1e-3
# rows (samples x output positions) a layer is fitted on at most. Measured (2000 images,
# two models; docs/benchmarks.md): 2^18 rows as accurate as every row (ResNet20 x1: up to
# 2M rows a layer) at a third of the time, and 2^16 as accurate as 2^18 (ResNet20 x1
# 83.2 / 83.2 %, VGG11q 87.8 / 87.9 %) with the refit about 40 % faster
DEFAULT_MAX_ROWS = 1 << 16
MODES = ("stored", "recompute")

_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# per-sample normalisations: merged like any tensor, the layers after them absorb the rest
_OTHER_NORMS = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_ADD_METHODS = ("add", "add_")
_BLOCK_ELEMENTS = 1 << 22  # rows x inputs of one block of the normal equations (16 MiB in float32)


# ---------------------------------------------------------------------------
# the report


@dataclass
class LayerFit:
    """One refitted layer. Residuals are ``||W x - t||^2 / ||t||^2`` on the calibration
    data, before (the averaged weights on the merged inputs) and after the fit."""

    name: str
    kind: str  # "linear" or "conv"
    norm: str | None  # the BatchNorm folded into the fit
    residual_sum: bool  # the target is read at a residual sum
    inputs: int  # p: input values per sample, with the constant of a fitted bias
    samples: int  # rows of the fit (samples x output positions)
    residual_before: float | None
    residual_after: float | None
    seconds: float


@dataclass
class RefitReport:
    mode: str  # "stored" or "recompute"
    memory_budget: int | None  # bytes that decided the mode (None: free memory unknown)
    ridge: float
    max_rows: int  # the row limit of one layer's fit (0: none)
    layers: list[LayerFit] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0  # the whole refit

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------
# the plan: which nodes are fitted, where their targets are read


@dataclass(eq=False)
class _Fit:
    """A Linear/Conv2d layer to refit; its target is read at ``point`` (the layer, its
    folded BatchNorm ``norm``, or a residual sum), less the merged value of ``other``."""

    node: fx.Node
    module: nn.Linear | nn.Conv2d
    norm: fx.Node | None
    bn: nn.modules.batchnorm._BatchNorm | None  # the module of ``norm``
    point: fx.Node
    other: fx.Node | None
    group: str | None

    @property
    def name(self) -> str:
        return str(self.node.target)

    @property
    def has_bias(self) -> bool:
        return self.module.bias is not None or self.norm is not None

    @property
    def channel_dim(self) -> int:
        return 1 if isinstance(self.module, nn.Conv2d) else -1


@dataclass(eq=False)
class _Norm:
    """A BatchNorm whose running statistics are measured on its merged inputs."""

    node: fx.Node
    module: nn.modules.batchnorm._BatchNorm

    @property
    def name(self) -> str:
        return str(self.node.target)


@dataclass(eq=False)
class _Opaque:
    """A submodule torch.fx cannot trace, with BatchNorms inside: they are reset on its
    merged inputs."""

    node: fx.Node
    module: nn.Module


_Step = _Fit | _Norm | _Opaque


@dataclass
class _Plan:
    nodes: list[fx.Node]  # execution order, without the output node
    position: dict[fx.Node, int]
    last_read: dict[fx.Node, int]  # position of a node's last reader
    steps: list[_Step]
    taps: dict[fx.Node, list[_Fit]]  # target points -> the fits reading them
    warnings: list[str]

    @property
    def fits(self) -> list[_Fit]:
        return [s for s in self.steps if isinstance(s, _Fit)]


def _trace(model: nn.Module) -> tuple[fx.Graph, set[str]]:
    """The graph of ``model`` and the paths of the submodules torch.fx could not trace
    (kept as opaque leaves)."""
    try:
        graph, tracer, _ = trace(model)
    except SpecError as e:
        raise RefitError(str(e)) from None
    return graph, tracer.leaves


def _conv_padding(conv: nn.Conv2d) -> tuple[int, int] | None:
    """The symmetric zero padding of ``conv`` as integers (None: asymmetric "same")."""
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        return None if any(t % 2 for t in total) else (total[0] // 2, total[1] // 2)
    return (int(conv.padding[0]), int(conv.padding[1]))


def _one_tensor_call(node: fx.Node) -> bool:
    return len(node.args) == 1 and isinstance(node.args[0], fx.Node) and not node.kwargs


def _unfit_reason(node: fx.Node, m: nn.Module, calls: Counter) -> str | None:
    """Why layer ``m`` cannot be refitted; None when it can."""
    if not isinstance(m, (nn.Linear, nn.Conv2d)):
        return f"{type(m).__name__} layers are not refitted"
    if calls[node.target] > 1:
        return "the module is called more than once"
    if not _one_tensor_call(node):
        return "it is not called on one tensor"
    if isinstance(m, nn.Conv2d):
        if m.groups != 1:
            return f"grouped convolution (groups={m.groups})"
        if m.padding_mode != "zeros":
            return f"padding mode {m.padding_mode!r} (only zero padding is refitted)"
        if _conv_padding(m) is None:
            return "asymmetric 'same' padding"
    return None


def _foldable(bn: nn.Module, layer: nn.Module) -> bool:
    kind = nn.BatchNorm2d if isinstance(layer, nn.Conv2d) else nn.BatchNorm1d
    out = layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
    return type(bn) is kind and bn.affine and bn.track_running_stats and bn.num_features == out


def _only_reader(node: fx.Node) -> fx.Node | None:
    readers = list(node.users)
    return readers[0] if len(readers) == 1 else None


def _residual_add(point: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """``(add, other summand)`` when ``point``'s only reader adds it to another node."""
    add = _only_reader(point)
    if add is None or add.kwargs or len(add.args) != 2:
        return None
    is_add = (add.op == "call_function" and add.target in _ADD_FUNCTIONS) or (
        add.op == "call_method" and add.target in _ADD_METHODS
    )
    a, b = add.args
    if not is_add or not isinstance(a, fx.Node) or not isinstance(b, fx.Node) or a is b:
        return None
    return add, (b if a is point else a)


def _plan(model: nn.Module, spec: MergeSpec) -> _Plan:
    graph, opaque = _trace(model)
    nodes = [n for n in graph.nodes if n.op != "output"]
    position = {n: i for i, n in enumerate(nodes)}
    end = len(nodes)  # the output node: values it reads are never dropped
    last_read = {
        n: max((position.get(u, end) for u in n.users), default=position[n]) for n in nodes
    }
    inputs = [n for n in nodes if n.op == "placeholder" and not n.args]
    if len(inputs) != 1:
        raise RefitError(f"{type(model).__name__}.forward must take one input tensor")
    modules = dict(model.named_modules())
    calls = Counter(n.target for n in nodes if n.op == "call_module")
    used_directly = {str(n.target).rpartition(".")[0] for n in nodes if n.op == "get_attr"}
    steps: list[_Step] = []
    warnings = []
    for node in nodes:
        if node.op != "call_module":
            continue
        m = modules[node.target]
        if node.target in opaque:
            resettable = has_batchnorm(m) and _one_tensor_call(node)
            norms = ""
            if has_batchnorm(m):
                norms = (
                    " and its BatchNorms are reset on its merged inputs"
                    if resettable
                    else " and its BatchNorms keep their averaged statistics"
                )
            warnings.append(
                f"module {node.target} ({type(m).__name__}) cannot be traced; its layers keep "
                f"their averaged weights{norms}"
            )
            if resettable:
                steps.append(_Opaque(node, m))
            continue
        if isinstance(m, _BATCHNORM):
            if m.track_running_stats and _one_tensor_call(node):
                steps.append(_Norm(node, m))
            continue
        if isinstance(m, _OTHER_NORMS) or not any(True for _ in m.parameters(recurse=False)):
            continue
        reason = _unfit_reason(node, m, calls)
        if reason is None and node.target in used_directly:
            reason = "its parameters are also used outside the module"
        if reason is not None:
            warnings.append(f"layer {node.target} keeps its averaged weights: {reason}")
            continue
        steps.append(_make_fit(node, m, spec, modules, calls, position))
    for n in nodes:
        if n.op == "get_attr" and isinstance(_attribute(model, str(n.target)), nn.Parameter):
            warnings.append(
                f"parameter {n.target} is used outside a module call; it keeps its averaged value"
            )
    taps: dict[fx.Node, list[_Fit]] = {}
    for s in steps:
        if isinstance(s, _Fit):
            taps.setdefault(s.point, []).append(s)
    return _Plan(nodes, position, last_read, steps, taps, warnings)


def _make_fit(
    node: fx.Node,
    layer: nn.Module,
    spec: MergeSpec,
    modules: dict[str, nn.Module],
    calls: Counter,
    position: dict[fx.Node, int],
) -> _Fit:
    norm = _only_reader(node)
    if not (
        norm is not None
        and norm.op == "call_module"
        and calls[norm.target] == 1
        and _foldable(modules[norm.target], layer)
    ):
        norm = None
    point, other = norm or node, None
    residual = _residual_add(point)
    if residual is not None and position[residual[1]] < position[node]:
        point, other = residual
    group = spec.axes.get(f"{node.target}.weight", {}).get(0)
    bn = modules[str(norm.target)] if norm is not None else None
    return _Fit(node, layer, norm, bn, point, other, group)


def _attribute(root: nn.Module, target: str) -> Any:
    value: Any = root
    for part in target.split("."):
        value = getattr(value, part)
    return value


# ---------------------------------------------------------------------------
# execution: one model, one chunk, node by node


class _Run:
    """``root`` evaluated node by node on one input; a value is dropped after its last
    reader. ``on_value(node, value)`` sees every value as it is computed."""

    def __init__(
        self,
        plan: _Plan,
        root: nn.Module,
        x: torch.Tensor,
        on_value: Callable[[fx.Node, Any], None] | None = None,
    ) -> None:
        self.plan, self.root, self.x, self.on_value = plan, root, x, on_value
        self.env: dict[fx.Node, Any] = {}
        self.done = 0  # plan.nodes[:done] have run

    def run_to(self, stop: int) -> None:
        """Run the nodes before position ``stop``."""
        last_read = self.plan.last_read
        while self.done < stop:
            node = self.plan.nodes[self.done]
            value = self._execute(node)
            if self.on_value is not None:
                self.on_value(node, value)
            self.env[node] = value
            for n in (*node.all_input_nodes, node):
                if last_read[n] == self.done:
                    del self.env[n]
            self.done += 1

    def _execute(self, node: fx.Node) -> Any:
        if node.op == "placeholder":
            if node.args:
                return node.args[0]  # an argument's default
            x, self.x = self.x, None  # held from here on (and dropped) like any value
            return x
        if node.op == "get_attr":
            return _attribute(self.root, str(node.target))
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), self.env.__getitem__)
        if node.op == "call_module":
            return self.root.get_submodule(str(node.target))(*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            obj, *rest = args
            return getattr(obj, str(node.target))(*rest, **kwargs)
        raise RefitError(f"cannot execute graph node {node.op} {node.target}")


def _map_channels(value: torch.Tensor, M: torch.Tensor | None, dim: int) -> torch.Tensor:
    """``M`` applied to the channel axis ``dim`` of ``value``."""
    if M is None:
        return value
    mapped = torch.tensordot(value, M.to(value), dims=([dim], [1]))
    return torch.movedim(mapped, -1, dim)


def _kept(fit: _Fit, value: torch.Tensor, rows_per_sample: float) -> int:
    """How many of the chunk's first samples give ``fit`` rows: all of them, unless a
    sample gives more than ``rows_per_sample`` rows (output positions; 0: no limit)."""
    per_sample = value[:1].numel() // value.shape[fit.channel_dim]
    if rows_per_sample and per_sample > rows_per_sample:
        return math.ceil(value.shape[0] * rows_per_sample / per_sample)
    return value.shape[0]


class _Chunk:
    """One calibration chunk: the merged network's run, every endpoint's run, and the
    targets (``sum_k w_k M_k z_k`` at each fit's point, on the samples that give the fit
    rows) of the fits in ``wanted``."""

    def __init__(
        self,
        plan: _Plan,
        merged: nn.Module,
        endpoints: Sequence[nn.Module],
        maps: dict[_Fit, list[tuple[float, torch.Tensor | None]]],
        x: torch.Tensor,
        wanted: Iterable[_Fit],
        rows_per_sample: float,
    ) -> None:
        self.plan, self.maps, self.wanted = plan, maps, set(wanted)
        self.rows_per_sample = rows_per_sample
        self.merged = _Run(plan, merged, x)
        self.endpoints = [_Run(plan, m, x, self._tapper(k)) for k, m in enumerate(endpoints)]
        self.targets: dict[_Fit, torch.Tensor] = {}

    def _tapper(self, k: int) -> Callable[[fx.Node, Any], None]:
        def tap(node: fx.Node, value: Any) -> None:
            for fit in self.plan.taps.get(node, ()):
                w, M = self.maps[fit][k]
                if fit in self.wanted and w:
                    rows = value[: _kept(fit, value, self.rows_per_sample)]
                    part = w * _map_channels(rows, M, fit.channel_dim)
                    self.targets[fit] = self.targets[fit] + part if fit in self.targets else part

        return tap

    def advance(self, step: _Step) -> None:
        """Run the merged network up to ``step``'s node, the endpoints through its point."""
        position = self.plan.position
        self.merged.run_to(position[step.node])
        if isinstance(step, _Fit):
            for run in self.endpoints:
                run.run_to(position[step.point] + 1)

    def input_of(self, step: _Step) -> torch.Tensor:
        return self.merged.env[step.node.args[0]]

    def target_of(self, fit: _Fit) -> torch.Tensor:
        target = self.targets.pop(fit)
        if fit.other is None:
            return target
        return target - self.merged.env[fit.other][: target.shape[0]]


# ---------------------------------------------------------------------------
# the normal equations


class NormalEquations:
    """``G = sum x x^T``, ``R = sum x t^T`` and ``sum |t|^2`` over streamed rows, in
    float64 (each block's products formed in the rows' precision)."""

    def __init__(self, inputs: int, outputs: int, device: torch.device | str = "cpu") -> None:
        self.G = torch.zeros(inputs, inputs, dtype=torch.float64, device=device)
        self.R = torch.zeros(inputs, outputs, dtype=torch.float64, device=device)
        self.target_norm = torch.zeros((), dtype=torch.float64, device=device)
        self.samples = 0

    def add(self, X: torch.Tensor, T: torch.Tensor) -> None:
        """Rows ``X`` (n x p) with their targets ``T`` (n x out)."""
        if X.dtype not in (torch.float32, torch.float64):  # half precision: sum in float32
            X, T = X.float(), T.float()
        XT = X.T
        self.G += gram(XT, XT).to(torch.float64)
        self.R += gram(XT, T.T).to(torch.float64)
        self.target_norm += torch.sum(T * T, dtype=torch.float64)
        self.samples += X.shape[0]

    def reduce_across_ranks(self) -> None:
        """Under distribution: every rank's sums added (the same bits on every rank)."""
        if not distributed.is_distributed():
            return
        count = torch.tensor([float(self.samples)], dtype=torch.float64, device=self.G.device)
        distributed.all_reduce_sum([self.G, self.R, self.target_norm, count])
        self.samples = int(count)

    def residual(self, WT: torch.Tensor) -> float | None:
        """``||W x - t||^2 / ||t||^2`` for ``WT`` (p x out); None when every target is 0."""
        tt = float(self.target_norm)
        if tt <= 0:
            return None
        err = float((self.G @ WT * WT).sum() - 2 * (self.R * WT).sum()) + tt
        return max(err, 0.0) / tt

    def solve(self, W0T: torch.Tensor, ridge: float) -> torch.Tensor | None:
        """``(G + lam I)^-1 (R + lam W0^T)``, ``lam = ridge trace(G) / p``; None when that
        is not finite.

        G is positive semi-definite, but products formed in float32 can leave it
        slightly indefinite where the inputs are (nearly) collinear; when the Cholesky
        factorisation fails, the solve uses G's eigendecomposition with the negative
        eigenvalues set to 0."""
        G, p = self.G, self.G.shape[0]
        if not (torch.isfinite(G).all() and torch.isfinite(self.R).all()):
            return None
        lam = ridge * float(torch.trace(G)) / p
        B = self.R + lam * W0T
        L, info = torch.linalg.cholesky_ex(G + lam * torch.eye(p, dtype=G.dtype, device=G.device))
        if int(info) == 0:
            WT = torch.cholesky_solve(B, L)
        else:
            e, V = torch.linalg.eigh(G)
            WT = V @ ((V.T @ B) / (e.clamp_min(0) + lam)[:, None])
        return WT if torch.isfinite(WT).all() else None


def _rows(
    fit: _Fit, x: torch.Tensor, t: torch.Tensor
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Blocks of (inputs, targets) rows of ``fit`` on one chunk (``t``: the targets of
    the samples that give rows, :func:`_kept`); conv inputs as patches."""
    x = x[: t.shape[0]]
    layer = fit.module
    if isinstance(layer, nn.Conv2d):
        padding = _conv_padding(layer)
        patch = layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1]
        positions = t.shape[2] * t.shape[3]
        step = max(1, _BLOCK_ELEMENTS // (patch * positions))
        for i in range(0, x.shape[0], step):
            cols = F.unfold(
                x[i : i + step], layer.kernel_size, layer.dilation, padding, layer.stride
            )
            X = cols.transpose(1, 2).reshape(-1, patch)
            T = t[i : i + step].flatten(2).transpose(1, 2).reshape(-1, t.shape[1])
            yield _with_constant(X, fit), T
    else:
        X, T = x.reshape(-1, layer.in_features), t.reshape(-1, layer.out_features)
        step = max(1, _BLOCK_ELEMENTS // layer.in_features)
        for i in range(0, X.shape[0], step):
            yield _with_constant(X[i : i + step], fit), T[i : i + step]


def _with_constant(X: torch.Tensor, fit: _Fit) -> torch.Tensor:
    return torch.cat([X, X.new_ones(X.shape[0], 1)], 1) if fit.has_bias else X


def _current(fit: _Fit, eq: NormalEquations) -> torch.Tensor:
    """The averaged weights as ``W0^T`` (p x out, float64), the prior of the fit.

    A folded BatchNorm is folded with the running statistics a reset would measure: the
    mean and (unbiased) variance of the layer's output on the merged inputs, read off
    ``G`` (its last row holds the inputs' sums, since the last input is the constant 1).
    The averaged running statistics are not used: under a dense alignment they are no
    statistics of anything (a variance can even come out negative)."""
    layer = fit.module
    W = layer.weight.detach().double().flatten(1)
    b = layer.bias.detach().double() if layer.bias is not None else torch.zeros_like(W[:, 0])
    if fit.bn is not None:
        WbT = torch.cat([W, b[:, None]], 1).T
        n = max(eq.samples, 1)
        mean = eq.G[-1] @ WbT / n
        var = ((eq.G @ WbT * WbT).sum(0) / n - mean.square()).clamp_min(0) * n / max(n - 1, 1)
        scale = fit.bn.weight.detach().double() / (var + fit.bn.eps).sqrt()
        W, b = scale[:, None] * W, scale * (b - mean) + fit.bn.bias.detach().double()
    return (torch.cat([W, b[:, None]], 1) if fit.has_bias else W).T.contiguous()


def _write(fit: _Fit, WT: torch.Tensor) -> torch.Tensor | None:
    """Put the fitted ``W^T`` (p x out) into the layer; returns the bias its folded
    BatchNorm must add (None without one)."""
    layer = fit.module
    W = WT.T
    b = W[:, -1] if fit.has_bias else None
    layer.weight.copy_(W[:, : W.shape[1] - int(fit.has_bias)].reshape(layer.weight.shape))
    if fit.bn is not None:
        if layer.bias is not None:
            layer.bias.zero_()  # the BatchNorm's shift carries the bias
        return b
    if layer.bias is not None:
        layer.bias.copy_(b)
    return None


class _Moments:
    """Per-channel count, mean and sum of squared deviations (channels on axis 1),
    merged over chunks in float64 (Chan et al.'s pairwise update)."""

    def __init__(self, channels: int, device: torch.device | str = "cpu") -> None:
        self.n = 0
        self.mean = torch.zeros(channels, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(channels, dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor) -> None:
        """One chunk's values. Deviations from a first mean are taken in the values'
        precision (float32 at least) and summed in float64, which corrects that mean to
        float64 accuracy: a bias written as ``b + mean`` can cancel to a small number."""
        v = x.detach().transpose(0, 1).reshape(x.shape[1], -1)
        if v.dtype not in (torch.float32, torch.float64):
            v = v.float()
        n, shift = v.shape[1], v.mean(1)
        deviation = v - shift[:, None]
        offset = deviation.sum(1, dtype=torch.float64) / n
        mean = shift.double() + offset
        squares = torch.linalg.vecdot(deviation, deviation).double()
        m2 = (squares - n * offset.square()).clamp_min(0)
        total = self.n + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.n * n / total)
        self.n = total

    def reduce_across_ranks(self) -> None:
        """Under distribution: the moments of every rank's values together. First the
        count and the sums give the common mean; then each rank's squared deviations
        about that mean, ``m2 + n (mean - common)^2``, are added."""
        if not distributed.is_distributed():
            return
        sums = torch.cat([self.mean.new_tensor([float(self.n)]), self.mean * self.n])
        distributed.all_reduce_sum([sums])
        n = int(sums[0])
        common = sums[1:] / max(n, 1)
        m2 = (self.m2 + self.n * (self.mean - common).square()).contiguous()
        distributed.all_reduce_sum([m2])
        self.n, self.mean, self.m2 = n, common, m2

    @property
    def variance(self) -> torch.Tensor:
        """Unbiased, as a train-mode BatchNorm records it."""
        return self.m2 / max(self.n - 1, 1)


# ---------------------------------------------------------------------------
# the driver


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    return 0


def _peak_bytes(plan: _Plan, model: nn.Module, x: torch.Tensor) -> int:
    """The most bytes of live values while ``model`` runs on ``x``."""
    run, peak = _Run(plan, model, x), 0
    for i in range(len(plan.nodes)):
        run.run_to(i + 1)
        peak = max(peak, sum(_nbytes(v) for v in run.env.values()))
    return peak


def _first_and_count(batches: Callable[[], Iterable[torch.Tensor]]) -> tuple[torch.Tensor, int]:
    """The first calibration chunk and the number of samples in all of them."""
    first, samples = None, 0
    for x in batches():
        first = x if first is None else first
        samples += x.shape[0]
    if first is None or samples == 0:
        raise RefitError("no calibration samples")
    return first, samples


def _choose_mode(
    plan: _Plan,
    merged: nn.Module,
    first: torch.Tensor,
    samples: int,
    n_models: int,
    budget: int | None,
    device: torch.device,
) -> str:
    """ "stored" when the live values of this rank's share of the ``samples`` for every
    model fit in ``budget`` bytes (None: no limit known), else "recompute". Under
    distribution every rank decides "recompute" when one of them must."""
    stored = True
    if budget is not None:
        per_sample = _peak_bytes(plan, merged, first.to(device)) / first.shape[0]
        share = math.ceil(samples / distributed.world_size())
        stored = per_sample * share * (n_models + 1) <= budget
    must_recompute = torch.tensor([0.0 if stored else 1.0], dtype=torch.float64)
    distributed.all_reduce_sum([must_recompute])
    return "stored" if float(must_recompute) == 0 else "recompute"


def _target_maps(
    fit: _Fit, alignment: Alignment, weights: Sequence[float], device: torch.device
) -> list[tuple[float, torch.Tensor | None]]:
    """``(w_k, M_k)`` of ``fit``'s output group per model (M None: the identity)."""
    if fit.group is None:
        return [(w, None) for w in weights]
    if fit.group not in alignment.groups:
        raise RefitError(f"the alignment has no transforms for group {fit.group}")
    Ms = alignment.groups[fit.group].M
    return [(w, Ms[k].to(device)) for k, w in enumerate(weights)]


def _check_endpoints(merged: nn.Module, endpoints: Sequence[nn.Module]) -> None:
    shapes = {k: v.shape for k, v in merged.state_dict().items()}
    kinds = {name: type(m) for name, m in merged.named_modules()}
    for k, model in enumerate(endpoints):
        if {n: v.shape for n, v in model.state_dict().items()} != shapes or {
            name: type(m) for name, m in model.named_modules()
        } != kinds:
            raise RefitError(f"model {k} does not have the merged network's modules and shapes")


def default_memory_budget(device: torch.device) -> int | None:
    """Half the memory free now where the stored activations would live: the GPU's for
    a CUDA device, else the RAM (None: unknown)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free // 2
    available = available_memory()
    return None if available is None else available // 2


@contextmanager
def _eval_mode(models: Sequence[nn.Module]) -> Iterator[None]:
    """Every module in eval mode; the previous modes restored afterwards."""
    modes = [(m, m.training) for model in models for m in model.modules()]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.train(training)


def check_refit_options(ridge: float, max_rows: int) -> None:
    """The refit's ridge (finite, >= 0) and row limit (an integer >= 0)."""
    if not (isinstance(ridge, (int, float)) and math.isfinite(ridge) and ridge >= 0):
        raise OptionError(f"the refit ridge must be finite and non-negative, got {ridge}")
    if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 0:
        raise OptionError(f"the refit's row limit must be an integer >= 0, got {max_rows}")


def _check_options(
    endpoints: Sequence[nn.Module], weights: Sequence[float], ridge: float, max_rows: int
) -> None:
    if not endpoints or len(weights) != len(endpoints):
        raise OptionError(f"{len(weights)} merge weights given for {len(endpoints)} models")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise OptionError("merge weights must be finite, non-negative and not all zero")
    check_refit_options(ridge, max_rows)


@torch.no_grad()
def refit(
    merged: nn.Module,
    endpoints: Sequence[nn.Module],
    spec: MergeSpec,
    alignment: Alignment,
    weights: Sequence[float],
    batches: Callable[[], Iterable[torch.Tensor]],
    ridge: float = DEFAULT_RIDGE,
    memory_budget: int | None = None,
    on_layer: Callable[[str, int, int], None] | None = None,
    max_rows: int = DEFAULT_MAX_ROWS,
) -> RefitReport:
    """Refit ``merged`` in place (weights and BatchNorm buffers) to the endpoints.

    ``endpoints`` are the unmerged models (left untouched), ``alignment`` maps their
    units into the merged network's, ``weights`` are the merge weights, and
    ``batches()`` yields the calibration inputs afresh on every call. ``memory_budget``
    (bytes; default :func:`default_memory_budget`: half the free memory of the device)
    decides between keeping every chunk's activations ("stored") and recomputing them
    per layer ("recompute").
    ``on_layer(name, i, total)`` is called after the i-th of ``total`` layers (i from 1).
    A layer whose calibration rows (samples x output positions) exceed ``max_rows`` is
    fitted on the rows of the first samples of every chunk, about ``max_rows`` in all
    (0: no limit); every sample still runs through the network and feeds the BatchNorm
    statistics. Raises :class:`RefitError` when the network cannot be traced or the endpoints
    differ from it."""
    _check_options(endpoints, weights, ridge, max_rows)
    _check_endpoints(merged, endpoints)
    plan = _plan(merged, spec)
    device = next((p.device for p in merged.parameters()), torch.device("cpu"))
    maps = {fit: _target_maps(fit, alignment, weights, device) for fit in plan.fits}
    start = time.perf_counter()
    if memory_budget is None:
        memory_budget = default_memory_budget(device)
    report = RefitReport("stored", memory_budget, ridge, max_rows, warnings=list(plan.warnings))
    first, samples = _first_and_count(batches)
    with _eval_mode([merged, *endpoints]):
        report.mode = _choose_mode(
            plan, merged, first, samples, len(endpoints), memory_budget, device
        )

        def chunk(x: torch.Tensor, wanted: Iterable[_Fit]) -> _Chunk:
            return _Chunk(plan, merged, endpoints, maps, x.to(device), wanted, max_rows / samples)

        if report.mode == "stored":
            stored = [chunk(x, plan.fits) for x in distributed.shard(batches())]

        def chunks(step: _Step) -> Iterable[_Chunk]:
            if report.mode == "stored":
                return stored
            wanted = [step] if isinstance(step, _Fit) else []
            return (chunk(x, wanted) for x in distributed.shard(batches()))

        folded_bias: dict[fx.Node, torch.Tensor] = {}
        fits = plan.fits
        for step in plan.steps:
            if isinstance(step, _Opaque):
                reset_batchnorm(step.module, _inputs(step, chunks(step)), device, sharded=True)
                continue
            if isinstance(step, _Norm):
                _measure_norm(step, chunks(step), folded_bias.pop(step.node, None), report)
                continue
            bias = _fit_layer(step, chunks(step), ridge, report)
            if bias is not None and step.norm is not None:
                folded_bias[step.norm] = bias
            if on_layer is not None:
                on_layer(step.name, fits.index(step) + 1, len(fits))
    report.seconds = time.perf_counter() - start
    return report


def _inputs(step: _Step, chunks: Iterable[_Chunk]) -> Iterator[torch.Tensor]:
    """``step``'s merged inputs, chunk by chunk."""
    for chunk in chunks:
        chunk.advance(step)
        yield chunk.input_of(step)


def _fit_layer(
    fit: _Fit, chunks: Iterable[_Chunk], ridge: float, report: RefitReport
) -> torch.Tensor | None:
    """Accumulate, solve and write one layer; returns the bias for its folded BatchNorm."""
    start = time.perf_counter()
    layer = fit.module
    outputs = layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
    inputs = layer.weight[0].numel() + int(fit.has_bias)
    eq = NormalEquations(inputs, outputs, device=layer.weight.device)
    for chunk in chunks:
        chunk.advance(fit)
        for X, T in _rows(fit, chunk.input_of(fit), chunk.target_of(fit)):
            eq.add(X, T)
    eq.reduce_across_ranks()
    W0T = _current(fit, eq)
    WT = eq.solve(W0T, ridge)
    if WT is None:
        report.warnings.append(
            f"layer {fit.name} keeps its averaged weights: the least-squares solve was not "
            "finite (non-finite activations, or a singular Gram matrix with ridge 0)"
        )
        return None
    p = W0T.shape[0]
    if eq.samples < p:
        report.warnings.append(
            f"layer {fit.name}: {eq.samples} samples for {p} inputs; the ridge towards the "
            "averaged weights decides what the data does not"
        )
    bias = _write(fit, WT)
    report.layers.append(
        LayerFit(
            name=fit.name,
            kind="conv" if isinstance(fit.module, nn.Conv2d) else "linear",
            norm=str(fit.norm.target) if fit.norm is not None else None,
            residual_sum=fit.other is not None,
            inputs=p,
            samples=eq.samples,
            residual_before=eq.residual(W0T),
            residual_after=eq.residual(WT),
            seconds=time.perf_counter() - start,
        )
    )
    return bias


def _measure_norm(
    norm: _Norm, chunks: Iterable[_Chunk], bias: torch.Tensor | None, report: RefitReport
) -> None:
    """Give a BatchNorm the running statistics of its merged inputs; with the ``bias``
    of a fit folded into it, also ``weight = sqrt(var + eps)``, ``bias = bias + mean``."""
    bn = norm.module
    moments = _Moments(bn.num_features, bn.running_mean.device)
    for x in _inputs(norm, chunks):
        moments.add(x)
    moments.reduce_across_ranks()
    if moments.n < 2:
        report.warnings.append(
            f"BatchNorm {norm.name}: one value per channel, its running variance is set to 0"
        )
    var = moments.variance
    bn.running_mean.copy_(moments.mean)
    bn.running_var.copy_(var)
    if bias is not None:
        bn.weight.copy_((var + bn.eps).sqrt())
        bn.bias.copy_(bias + moments.mean)


# ---------------------------------------------------------------------------
# the pipeline step


def refit_merged(
    loaded: LoadedModels,
    alignment: Alignment,
    weights: Sequence[float],
    model: nn.Module,
    calib: Dataset,
    batch_size: int,
    device: str,
    ridge: float = DEFAULT_RIDGE,
    progress: Progress | None = None,
    memory_budget: int | None = None,
    max_rows: int = DEFAULT_MAX_ROWS,
) -> RefitReport:
    """Step 5: refit the assembled ``model`` in place to the loaded endpoints on ``calib``,
    with a progress bar over the layers."""
    progress = progress or Progress()
    endpoints = [loaded.build(sd, device) for sd in loaded.state_dicts]

    def on_layer(name: str, i: int, total: int) -> None:
        if i == 1:
            progress.start("refit", total)
        progress.advance(1)

    try:
        return refit(
            model,
            endpoints,
            loaded.spec,
            alignment,
            weights,
            lambda: calib.batches(batch_size),
            ridge,
            memory_budget,
            on_layer,
            max_rows,
        )
    finally:
        progress.stop()


@dataclass
class Refitted:
    """A merge assembled and refitted (:func:`assemble_and_refit`)."""

    state: dict[str, torch.Tensor]
    model: nn.Module
    report: RefitReport

    @property
    def batchnorm(self) -> str:
        """What happened to the BatchNorms, in the report's words."""
        if not has_batchnorm(self.model):
            return "none (no BatchNorm)"
        return "running statistics written by the refit (no separate reset)"

    def section(self) -> dict[str, Any]:
        """The report's "refit" section (its warnings go to the report's own)."""
        out = self.report.to_dict()
        del out["warnings"]
        return out


def assemble_and_refit(
    loaded: LoadedModels,
    alignment: Alignment,
    weights: Sequence[float],
    reference: int,
    calib: Dataset,
    batch_size: int,
    device: str,
    ridge: float,
    max_rows: int,
    progress: Progress,
    timer: Timer,
    warnings: list[str],
) -> Refitted | None:
    """Steps 4 and 5 with the refit: assemble without BatchNorm handling, then refit.
    The refit's warnings are appended to ``warnings``; when the network cannot be refitted
    (:class:`RefitError`), the warning "refit skipped: <reason>" and None (the caller
    then merges without the refit)."""
    with timer.phase("apply"):
        model = assemble(loaded, alignment, weights, reference, device)
    if has_batchnorm(model) and len(calib) < 2:
        raise DataError(
            f"the refit's BatchNorm statistics need at least 2 calibration samples; got "
            f"{len(calib)}: give more calibration data, or keep the merged statistics with "
            "--no-refit --no-reset-bn"
        )
    try:
        with timer.phase("refit"):
            report = refit_merged(
                loaded, alignment, weights, model, calib, batch_size, device, ridge, progress,
                max_rows=max_rows,
            )  # fmt: skip
    except RefitError as e:
        warnings.append(f"refit skipped: {e}")
        return None
    warnings.extend(report.warnings)
    return Refitted(state_of(model, loaded, reference), model, report)


def refit_or_fix_batchnorm(
    loaded: LoadedModels,
    alignment: Alignment,
    weights: Sequence[float],
    reference: int,
    calib: Dataset | None,
    stats: Statistics | None,
    bn_mode: str,
    reset_bn: bool,
    batch_size: int,
    device: str,
    refit: bool,
    ridge: float,
    max_rows: int,
    progress: Progress,
    timer: Timer,
    warnings: list[str],
) -> tuple[dict[str, torch.Tensor], nn.Module, str, Refitted | None]:
    """Steps 4 and 5 as a run takes them: with ``refit`` (and calibration data), assemble
    and refit; without it, or when the network cannot be refitted, assemble and fix
    BatchNorm (:func:`build_merged`), first gathering the BatchNorm outputs' statistics
    when ``stats`` lacks them and renormalisation needs them.
    Returns (state dict, model, what was done to BatchNorm, the refit or None)."""
    if refit and calib is None:
        warnings.append("refit skipped: no calibration data (--data)")
    elif refit:
        refitted = assemble_and_refit(
            loaded, alignment, weights, reference, calib, batch_size, device, ridge,
            max_rows, progress, timer, warnings,
        )  # fmt: skip
        if refitted is not None:
            return refitted.state, refitted.model, refitted.batchnorm, refitted
    if calib is not None and not (stats and stats.norms):
        if needs_norm_statistics(loaded, bn_mode, reset_bn):
            with timer.phase("statistics"):
                stats = gather_statistics(
                    loaded, calib, batch_size, device, progress, group_stats=False
                )
    with timer.phase("apply"):
        state, model, bn_done = build_merged(
            loaded, alignment, weights, reference, calib, stats, bn_mode, reset_bn,
            batch_size, device,
        )  # fmt: skip
    return state, model, bn_done, None
