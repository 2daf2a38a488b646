"""The refit's plan of the network: the ``torch.fx`` graph (traced with feature-group
discovery's tracer), and in it the layers to fit (with the BatchNorm folded into each
and the point where its target is read), the BatchNorms to measure and the opaque
submodules to reset, in execution order."""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from ...models.discover import trace
from ...models.spec import MergeSpec
from ...runtime.errors import RefitError, SpecError
from ..bn import has_batchnorm

BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
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

# the plan: which nodes are fitted, where their targets are read


@dataclass(eq=False)
class Fit:
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
class Norm:
    """A BatchNorm whose running statistics are measured on its merged inputs."""

    node: fx.Node
    module: nn.modules.batchnorm._BatchNorm

    @property
    def name(self) -> str:
        return str(self.node.target)


@dataclass(eq=False)
class Opaque:
    """A submodule torch.fx cannot trace, with BatchNorms inside: they are reset on its
    merged inputs."""

    node: fx.Node
    module: nn.Module


Step = Fit | Norm | Opaque


@dataclass
class Plan:
    nodes: list[fx.Node]  # execution order, without the output node
    position: dict[fx.Node, int]
    last_read: dict[fx.Node, int]  # position of a node's last reader
    steps: list[Step]
    taps: dict[fx.Node, list[Fit]]  # target points -> the fits reading them
    warnings: list[str]

    @property
    def fits(self) -> list[Fit]:
        return [s for s in self.steps if isinstance(s, Fit)]


def _trace(model: nn.Module) -> tuple[fx.Graph, set[str]]:
    """The graph of ``model`` and the paths of the submodules torch.fx could not trace
    (kept as opaque leaves)."""
    try:
        graph, tracer, _ = trace(model)
    except SpecError as e:
        raise RefitError(str(e)) from None
    return graph, tracer.leaves


def conv_padding(conv: nn.Conv2d) -> tuple[int, int] | None:
    """The symmetric zero padding of ``conv`` as integers (None: asymmetric "same")."""
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        return None if any(t % 2 for t in total) else (total[0] // 2, total[1] // 2)
    return (int(conv.padding[0]), int(conv.padding[1]))


def one_tensor_call(node: fx.Node) -> bool:
    return len(node.args) == 1 and isinstance(node.args[0], fx.Node) and not node.kwargs


def _unfit_reason(node: fx.Node, m: nn.Module, calls: Counter) -> str | None:
    """Why layer ``m`` cannot be refitted; None when it can."""
    if not isinstance(m, (nn.Linear, nn.Conv2d)):
        return f"{type(m).__name__} layers are not refitted"
    if calls[node.target] > 1:
        return "the module is called more than once"
    if not one_tensor_call(node):
        return "it is not called on one tensor"
    if isinstance(m, nn.Conv2d):
        if m.groups != 1:
            return f"grouped convolution (groups={m.groups})"
        if m.padding_mode != "zeros":
            return f"padding mode {m.padding_mode!r} (only zero padding is refitted)"
        if conv_padding(m) is None:
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


def make_plan(model: nn.Module, spec: MergeSpec) -> Plan:
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
    steps: list[Step] = []
    warnings = []
    for node in nodes:
        if node.op != "call_module":
            continue
        m = modules[node.target]
        if node.target in opaque:
            resettable = has_batchnorm(m) and one_tensor_call(node)
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
                steps.append(Opaque(node, m))
            continue
        if isinstance(m, BATCHNORMS):
            if m.track_running_stats and one_tensor_call(node):
                steps.append(Norm(node, m))
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
        if n.op == "get_attr" and isinstance(attribute(model, str(n.target)), nn.Parameter):
            warnings.append(
                f"parameter {n.target} is used outside a module call; it keeps its averaged value"
            )
    taps: dict[fx.Node, list[Fit]] = {}
    for s in steps:
        if isinstance(s, Fit):
            taps.setdefault(s.point, []).append(s)
    return Plan(nodes, position, last_read, steps, taps, warnings)


def _make_fit(
    node: fx.Node,
    layer: nn.Module,
    spec: MergeSpec,
    modules: dict[str, nn.Module],
    calls: Counter,
    position: dict[fx.Node, int],
) -> Fit:
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
    return Fit(node, layer, norm, bn, point, other, group)


def attribute(root: nn.Module, target: str) -> Any:
    value: Any = root
    for part in target.split("."):
        value = getattr(value, part)
    return value


# ---------------------------------------------------------------------------
# execution: one model, one chunk, node by node
