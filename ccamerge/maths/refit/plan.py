"""The refit's plan of the network: the ``torch.fx`` graph (traced with feature-group
discovery's tracer), and in it the layers to fit (with the BatchNorm folded into each
and the point where its target is read), the BatchNorms to measure and the opaque
submodules to reset, in execution order."""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import fx, nn

from ...models.discover import LAYER_ARGS, call_args, layer_name, trace
from ...models.spec import MergeSpec
from ...runtime.errors import RefitError, SpecError, UntracedError
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

# the layers as the refit sees them: a module's or a functional call's tensors


@dataclass(eq=False)
class Layer:
    """A Linear or Conv2d layer: a module, or ``F.linear``/``F.conv2d`` on the model's
    own tensors (a subclass's forward, timm's ``Linear``). ``weight``/``bias`` are the
    model's tensors themselves: the fit writes them in place."""

    name: str
    weight: torch.Tensor
    bias: torch.Tensor | None
    conv: bool
    tensors: tuple[str, ...]  # the state-dict names of weight (and bias)
    stride: tuple[int, ...] = (1, 1)
    padding: Any = (0, 0)
    dilation: tuple[int, ...] = (1, 1)
    groups: int = 1
    padding_mode: str = "zeros"

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[2:])

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1] * self.groups

    @property
    def inputs(self) -> int:
        """``in_features`` of a Linear."""
        return self.weight.shape[1]

    @property
    def outputs(self) -> int:
        return self.weight.shape[0]

    @classmethod
    def of_module(cls, name: str, m: nn.Linear | nn.Conv2d) -> Layer:
        names = (f"{name}.weight",) + ((f"{name}.bias",) if m.bias is not None else ())
        if isinstance(m, nn.Linear):
            return cls(name, m.weight, m.bias, False, names)
        conv = (m.stride, m.padding, m.dilation, m.groups, m.padding_mode)
        return cls(name, m.weight, m.bias, True, names, *conv)

    @classmethod
    def of_call(cls, node: fx.Node, root: nn.Module) -> Layer:
        args = call_args(node)
        names = tuple(str(args[k].target) for k in ("weight", "bias") if args.get(k) is not None)
        weight, bias = attribute(root, names[0]), args.get("bias")
        tensors = (weight, None if bias is None else attribute(root, names[1]))
        if node.target is F.linear:
            return cls(layer_name(names[0]), *tensors, False, names)
        pair = [_pair(args.get(k, d)) for k, d in (("stride", 1), ("padding", 0), ("dilation", 1))]
        padding = args["padding"] if isinstance(args.get("padding"), str) else pair[1]
        conv = (pair[0], padding, pair[2], int(args.get("groups", 1)))
        return cls(layer_name(names[0]), *tensors, True, names, *conv)


@dataclass(eq=False)
class AffineNorm:
    """A LayerNorm over the last axis with a per-channel gain (and bias): a module's, or
    the tensors ``F.layer_norm`` is called with (a subclass's forward, timm's
    ``LayerNorm2d``). The fit writes ``weight``/``bias`` in place."""

    name: str
    weight: torch.Tensor
    bias: torch.Tensor | None
    eps: float
    tensors: tuple[str, ...]  # the state-dict names of weight (and bias)
    conv: ClassVar[bool] = False  # channels on the last axis, like a Linear's

    @property
    def outputs(self) -> int:
        return self.weight.numel()

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` normalised over its last axis, without the affine part."""
        return F.layer_norm(x, (self.outputs,), eps=self.eps)

    @classmethod
    def of_node(cls, node: fx.Node, root: nn.Module) -> AffineNorm | None:
        """The LayerNorm ``node`` runs, when it normalises one axis with a gain."""
        if node.op == "call_module":
            m = root.get_submodule(str(node.target))
            if not (isinstance(m, nn.LayerNorm) and m.weight is not None):
                return None
            if len(m.normalized_shape) != 1 or not one_tensor_call(node):
                return None
            names = tuple(
                f"{node.target}.{t}" for t in ("weight", "bias") if getattr(m, t) is not None
            )
            return cls(str(node.target), m.weight, m.bias, m.eps, names)
        if node.op != "call_function" or node.target is not F.layer_norm:
            return None
        args = call_args(node)
        shape, weight, bias = args.get("normalized_shape"), args.get("weight"), args.get("bias")
        tensors = [weight] + ([bias] if bias is not None else [])
        if not all(isinstance(t, fx.Node) and t.op == "get_attr" for t in tensors):
            return None
        if not isinstance(shape, (tuple, list)) or len(shape) != 1:
            return None
        names = tuple(str(t.target) for t in tensors)
        bias_tensor = attribute(root, names[1]) if bias is not None else None
        eps = float(args.get("eps", 1e-5))
        return cls(layer_name(names[0]), attribute(root, names[0]), bias_tensor, eps, names)


def _pair(v: Any) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (int(v), int(v))


@dataclass(eq=False)
class BatchNorm:
    """A BatchNorm's tensors: a module's, or those ``F.batch_norm`` is called with (a
    BatchNorm + activation module's forward)."""

    name: str
    running_mean: torch.Tensor
    running_var: torch.Tensor
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float
    dims: int  # 1: (N, C) or (N, C, L); 2: (N, C, H, W)

    @property
    def num_features(self) -> int:
        return self.running_mean.numel()

    @classmethod
    def of_module(cls, name: str, m: nn.modules.batchnorm._BatchNorm) -> BatchNorm | None:
        if not (m.track_running_stats and m.running_mean is not None):
            return None
        dims = 2 if isinstance(m, nn.BatchNorm2d) else 1 if isinstance(m, nn.BatchNorm1d) else 3
        return cls(name, m.running_mean, m.running_var, m.weight, m.bias, m.eps, dims)

    @classmethod
    def of_call(cls, node: fx.Node, root: nn.Module) -> BatchNorm | None:
        """None unless the call uses running statistics of the model (eval mode)."""
        args = call_args(node)
        names = [args.get(k) for k in ("running_mean", "running_var", "weight", "bias")]
        if args.get("training", False) or not all(isinstance(n, fx.Node) for n in names[:2]):
            return None
        if not all(n is None or (isinstance(n, fx.Node) and n.op == "get_attr") for n in names):
            return None
        t = [None if n is None else attribute(root, str(n.target)) for n in names]
        eps = float(args.get("eps", 1e-5))
        return cls(str(names[0].target).rpartition(".")[0], *t, eps, 0)


# the plan: which nodes are fitted, where their targets are read


@dataclass(eq=False)
class Fit:
    """A Linear/Conv2d layer to refit, or a LayerNorm's gain and bias; its target is read
    at ``point`` (the layer, its folded BatchNorm ``norm``, or a residual sum; a
    LayerNorm's own output), less the merged value of ``other``."""

    node: fx.Node
    layer: Layer | AffineNorm
    norm: fx.Node | None
    bn: BatchNorm | None  # the BatchNorm of ``norm``
    point: fx.Node
    other: fx.Node | None
    group: str | None

    @property
    def name(self) -> str:
        return self.layer.name

    @property
    def has_bias(self) -> bool:
        return self.layer.bias is not None or self.norm is not None

    @property
    def channel_dim(self) -> int:
        return 1 if self.layer.conv else -1


@dataclass(eq=False)
class Norm:
    """A BatchNorm whose running statistics are measured on its merged inputs."""

    node: fx.Node
    bn: BatchNorm

    @property
    def name(self) -> str:
        return self.bn.name


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
    (kept as opaque leaves). Traced in eval mode: a forward that passes ``self.training``
    to a function (``F.batch_norm``, ``F.dropout``) is recorded as evaluated."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        graph, tracer, _ = trace(model)
    except SpecError as e:
        raise UntracedError(str(e)) from None
    finally:
        for m, training in modes:
            m.train(training)
    return graph, tracer.leaves


def conv_padding(conv: Layer) -> tuple[int, int] | None:
    """The symmetric zero padding of ``conv`` as integers (None: asymmetric "same")."""
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        return None if any(t % 2 for t in total) else (total[0] // 2, total[1] // 2)
    return (int(conv.padding[0]), int(conv.padding[1]))


def one_tensor_call(node: fx.Node) -> bool:
    return len(node.args) == 1 and isinstance(node.args[0], fx.Node) and not node.kwargs


def _unfit_reason(node: fx.Node, layer: Layer, uses: Counter) -> str | None:
    """Why ``layer`` cannot be refitted; None when it can."""
    if max(uses[t] for t in layer.tensors) > 1:
        return "the layer is called more than once or its weights are used elsewhere"
    if node.op == "call_module" and not one_tensor_call(node):
        return "it is not called on one tensor"
    if layer.conv:
        if layer.padding_mode != "zeros":
            return f"padding mode {layer.padding_mode!r} (only zero padding is refitted)"
        if conv_padding(layer) is None:
            return "asymmetric 'same' padding"
    return None


def _batchnorm(node: fx.Node | None, root: nn.Module, calls: Counter) -> BatchNorm | None:
    """The BatchNorm ``node`` runs (a module called once, or ``F.batch_norm`` on the
    model's running statistics) on one tensor; None for anything else."""
    if node is None:
        return None
    if node.op == "call_module":
        m = root.get_submodule(str(node.target))
        ok = isinstance(m, BATCHNORMS) and calls[node.target] == 1 and one_tensor_call(node)
        return BatchNorm.of_module(str(node.target), m) if ok else None
    if node.op == "call_function" and node.target is F.batch_norm:
        return BatchNorm.of_call(node, root)
    return None


def _foldable(bn: BatchNorm, layer: Layer) -> bool:
    dims = (0, 2) if layer.conv else (0, 1)
    affine = bn.weight is not None and bn.bias is not None
    return affine and bn.dims in dims and bn.num_features == layer.outputs


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
    calls = Counter(n.target for n in nodes if n.op == "call_module")
    steps: list[Step] = []
    warnings: list[str] = []
    layers = {n: layer for n in nodes if (layer := _layer(n, model, opaque)) is not None}
    uses = _uses(nodes, layers)
    for node in nodes:
        step = _step(node, model, opaque, calls, warnings)
        norm = AffineNorm.of_node(node, model) if step is None else None
        if step is not None:
            steps.append(step)
        elif norm is not None:
            if _shared(node, norm, uses, calls):
                warnings.append(
                    f"LayerNorm {norm.name} keeps its averaged gain and bias: it is called more "
                    "than once or its tensors are used elsewhere"
                )
                continue
            group = spec.axes.get(norm.tensors[0], {}).get(0)
            steps.append(Fit(node, norm, None, None, node, None, group))
        elif node not in layers:
            _other_layer(node, model, opaque, warnings)
        else:
            reason = _unfit_reason(node, layers[node], uses)
            if reason is not None:
                warnings.append(f"layer {layers[node].name} keeps its averaged weights: {reason}")
                continue
            steps.append(_make_fit(node, layers[node], spec, model, calls, position))
    recognised = {str(a.target) for n in nodes if _is_layer_call(n) for a in n.all_input_nodes}
    for n in nodes:
        if n.op != "get_attr" or str(n.target) in recognised:
            continue
        if isinstance(attribute(model, str(n.target)), nn.Parameter):
            warnings.append(
                f"parameter {n.target} is used outside a module call; it keeps its averaged value"
            )
    taps: dict[fx.Node, list[Fit]] = {}
    for s in steps:
        if isinstance(s, Fit):
            taps.setdefault(s.point, []).append(s)
    return Plan(nodes, position, last_read, steps, taps, warnings)


def _is_layer_call(node: fx.Node) -> bool:
    """A functional layer on the model's tensors (its get_attr arguments are no loose
    parameters: the layer is fitted, measured, or a per-sample norm merged as-is)."""
    return node.op == "call_function" and node.target in LAYER_ARGS


def _layer(node: fx.Node, root: nn.Module, opaque: set[str]) -> Layer | None:
    """The Linear/Conv2d layer ``node`` runs, as a module or a functional call."""
    if node.op == "call_module" and node.target not in opaque:
        m = root.get_submodule(str(node.target))
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            return Layer.of_module(str(node.target), m)
    if node.op == "call_function" and node.target in (F.linear, F.conv2d):
        weight = call_args(node).get("weight")
        bias = call_args(node).get("bias")
        tensors = [weight] + ([bias] if bias is not None else [])
        if all(isinstance(t, fx.Node) and t.op == "get_attr" for t in tensors):
            return Layer.of_call(node, root)
    return None


def _uses(nodes: list[fx.Node], layers: dict[fx.Node, Layer]) -> Counter:
    """How often each tensor is read: by its module's calls and by get_attr nodes."""
    uses: Counter = Counter()
    for n in nodes:
        if n.op == "get_attr":
            uses[str(n.target)] += 1
        elif n.op == "call_module" and n in layers:
            uses.update(layers[n].tensors)
    return uses


def _shared(node: fx.Node, norm: AffineNorm, uses: Counter, calls: Counter) -> bool:
    """Whether a LayerNorm's module is called twice or its tensors are read elsewhere."""
    if node.op == "call_module":
        return calls[node.target] > 1
    reads = [a for a in node.all_input_nodes if a.op == "get_attr"]
    return any(uses[t] > 1 for t in norm.tensors) or any(len(a.users) > 1 for a in reads)


def _other_layer(node: fx.Node, root: nn.Module, opaque: set[str], warnings: list[str]) -> None:
    """A warning for a module with weights that is neither refitted nor a norm."""
    if node.op != "call_module" or node.target in opaque:
        return
    m = root.get_submodule(str(node.target))
    if isinstance(m, BATCHNORMS + _OTHER_NORMS) or not any(True for _ in m.parameters(False)):
        return
    warnings.append(
        f"layer {node.target} keeps its averaged weights: {type(m).__name__} layers are not "
        "refitted"
    )


def _step(
    node: fx.Node, root: nn.Module, opaque: set[str], calls: Counter, warnings: list[str]
) -> Step | None:
    """An opaque submodule to reset or a BatchNorm to measure; else None."""
    if node.op == "call_module" and node.target in opaque:
        m = root.get_submodule(str(node.target))
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
        return Opaque(node, m) if resettable else None
    bn = _batchnorm(node, root, calls)
    return Norm(node, bn) if bn is not None else None


def _make_fit(
    node: fx.Node,
    layer: Layer,
    spec: MergeSpec,
    root: nn.Module,
    calls: Counter,
    position: dict[fx.Node, int],
) -> Fit:
    norm = _only_reader(node)
    bn = _batchnorm(norm, root, calls)
    if bn is None or not _foldable(bn, layer):
        norm, bn = None, None
    point, other = norm or node, None
    residual = _residual_add(point)
    if residual is not None and position[residual[1]] < position[node]:
        point, other = residual
    group = spec.axes.get(layer.tensors[0], {}).get(0)
    return Fit(node, layer, norm, bn, point, other, group)


def output_node(plan: Plan, module: str) -> fx.Node | None:
    """The node whose value a module the plan traces through returns: the one node made
    inside the module that a node outside it reads; None when the module is called more
    than once or its output is not one node."""

    def inside(n: fx.Node) -> bool:
        return module in n.meta.get("nn_module_stack", {})

    if any(f"{module}@1" in n.meta.get("nn_module_stack", {}) for n in plan.nodes):
        return None
    outs = [n for n in plan.nodes if inside(n) and any(not inside(u) for u in n.users)]
    return outs[0] if len(outs) == 1 else None


def attribute(root: nn.Module, target: str) -> Any:
    value: Any = root
    for part in target.split("."):
        value = getattr(value, part)
    return value


# ---------------------------------------------------------------------------
# execution: one model, one chunk, node by node
