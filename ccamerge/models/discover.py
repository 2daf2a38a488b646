"""Feature groups discovered from a model's code by torch.fx tracing.

:func:`discover` traces ``model.forward`` symbolically, runs the traced graph
once on a small example input to learn every tensor's shape, and follows the
output channels of each ``Linear``/``Conv`` forward through the graph:

* elementwise functions (relu, gelu, tanh, sigmoid, leaky_relu, silu, ... in
  module, functional and method form), dropout, identity, scalar arithmetic,
  ``.contiguous()``/``.clone()``: the same units;
* BatchNorm on the channel axis and LayerNorm over exactly the channel axis
  (the last one): the same units, and the norm's ``weight``/``bias`` (and
  running statistics) join the group;
* pooling (max/avg/adaptive) over spatial axes and means/sums over them: the
  same units;
* flatten/view/reshape/squeeze: the same units when only size-1 axes move
  (a 1x1 map flattened, or a 2-D tensor); a flatten of more than one spatial
  position into features is not a group axis, so it stays untransformed;
* ``a + b``, ``a - b``, ``a * b`` of two tensors of one shape, or of a tensor and
  a gate with size-1 spatial axes (squeeze-excitation): both operands' units are
  tied into one group (a union-find over groups): this is how residual streams
  become one group;
* ``x * self.gamma`` / ``x + self.beta`` with one value of the model's per unit
  (layer scale, a bias): the same units, the tensor joins them;
* ``permute``/``transpose`` keeping the batch axis first: the units move along;
* layers as functional calls on the model's tensors (``F.linear``, ``F.conv*d``,
  ``F.batch_norm``, ``F.layer_norm``, ``F.group_norm``: a subclass's own forward)
  as the modules they compute; GroupNorm keeps its groups' blocks;
* depthwise convolutions: their outputs are their input's units; grouped ones
  keep ``groups`` blocks of input and output; such groups (and those with a gain
  or a GroupNorm) are marked ``permutation`` (only permutations within their
  blocks are exact, and the alignment is made so);
* ``torch.cat`` along the units' axis: a concatenation of its parts' groups (its
  readers are transformed by the block-diagonal map of theirs);
* ``nn.Embedding``: new units (its table's columns); indexing that keeps the batch and
  the units' axes whole (``x[:, 0]``): the same units; ``torch.cat`` along the tokens
  (a class token before the patches) and position embeddings added: one set of units,
  the model's tensors joining it;
* recognised self-attention layers (models/attention.py): one step that reads its
  input's units and writes new ones; its heads become two groups of their own;
* the model's input and output are never transformed, so every group that
  reaches either stays untransformed.

Anything else (stacking, reshapes that mix channels, matmul/unrecognised attention, a module
called twice or parameters shared between modules, other parameters used
directly in ``forward``, unknown functions and
modules) freezes every group it touches: those groups stay untransformed, with
a warning naming the node or module. A submodule that torch.fx cannot trace
(data-dependent control flow, ...) is kept as an opaque leaf and treated the
same way.

Each group's collection point is a module whose input or output is exactly
the group's activations after its last nonlinearity, normalisation or
addition (docs/cca.md, 'Feature groups'): the output of that nonlinearity's
module, of the block that returns it, or the input of the module that consumes
it. Functional ops have no module: when no module sees those activations the
group is collected at the latest of its tensors that a module does see, with a
warning.

Norms under dense transforms: BatchNorm and LayerNorm are equivariant to
permutations of their normalised axis, so permutation methods stay exact;
a dense CCA transform does not commute with either (the LayerNorm statistics
mix all units): accepted, as for ReLU (docs/cca.md, 'Transforming and averaging').
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import operator
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from ..runtime.errors import SpecError
from .attention import AttentionLayout, attention_layout
from .spec import Concat, FeatureGroup, MergeSpec

log = logging.getLogger(__name__)
log.addHandler(logging.NullHandler())  # the CLI shows the returned warnings itself

# ---------------------------------------------------------------------------
# what the walk knows

_ACTIVATION_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.GELU,
    nn.Tanh,
    nn.Sigmoid,
    nn.SiLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Mish,
    nn.Softplus,
)
_TRANSPARENT_MODULES: tuple[type[nn.Module], ...] = (
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
)
_POOL_MODULES: dict[type[nn.Module], int] = {
    nn.MaxPool1d: 1,
    nn.MaxPool2d: 2,
    nn.MaxPool3d: 3,
    nn.AvgPool1d: 1,
    nn.AvgPool2d: 2,
    nn.AvgPool3d: 3,
    nn.AdaptiveMaxPool1d: 1,
    nn.AdaptiveMaxPool2d: 2,
    nn.AdaptiveMaxPool3d: 3,
    nn.AdaptiveAvgPool1d: 1,
    nn.AdaptiveAvgPool2d: 2,
    nn.AdaptiveAvgPool3d: 3,
}
_WRITERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_NORMS = BATCHNORMS + (nn.LayerNorm, nn.GroupNorm)
_KNOWN_MODULES = (
    _WRITERS + _NORMS + _ACTIVATION_MODULES + _TRANSPARENT_MODULES + (nn.Flatten, nn.PReLU)
)
_KNOWN_MODULES += tuple(_POOL_MODULES) + (nn.Embedding,)

_ACTIVATION_FUNCTIONS = {
    F.relu,
    F.relu_,
    F.relu6,
    F.leaky_relu,
    F.gelu,
    F.tanh,
    F.sigmoid,
    F.silu,
    F.elu,
    F.celu,
    F.selu,
    F.hardtanh,
    F.hardswish,
    F.hardsigmoid,
    F.mish,
    F.softplus,
    torch.relu,
    torch.relu_,
    torch.tanh,
    torch.sigmoid,
    torch.clamp,
}
_ACTIVATION_METHODS = {
    "relu",
    "relu_",
    "tanh",
    "tanh_",
    "sigmoid",
    "sigmoid_",
    "clamp",
    "clamp_",
    "clamp_min",
    "clamp_min_",
    "clamp_max",
    "clamp_max_",
}
_TRANSPARENT_FUNCTIONS = {
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    F.alpha_dropout,
}
_TRANSPARENT_METHODS = {"contiguous", "clone", "detach", "float", "double"}
_POOL_FUNCTIONS = {
    F.max_pool1d: 1,
    F.max_pool2d: 2,
    F.max_pool3d: 3,
    F.avg_pool1d: 1,
    F.avg_pool2d: 2,
    F.avg_pool3d: 3,
    F.adaptive_max_pool1d: 1,
    F.adaptive_max_pool2d: 2,
    F.adaptive_max_pool3d: 3,
    F.adaptive_avg_pool1d: 1,
    F.adaptive_avg_pool2d: 2,
    F.adaptive_avg_pool3d: 3,
}
_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze}
_RESHAPE_METHODS = {"flatten", "view", "reshape", "squeeze", "unsqueeze"}
_REDUCE_FUNCTIONS = {torch.mean, torch.sum, torch.amax}
_REDUCE_METHODS = {"mean", "sum", "amax"}
# two tensors of one shape tie their units; with a number they act elementwise
_TIE_FUNCTIONS = {
    operator.add,
    operator.sub,
    operator.mul,
    operator.iadd,
    operator.isub,
    operator.imul,
    torch.add,
    torch.sub,
    torch.mul,
}
_TIE_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_"}
_ARITHMETIC_FUNCTIONS = {operator.truediv, operator.itruediv, torch.div, operator.neg, torch.neg}
_ARITHMETIC_METHODS = {"div", "div_", "neg"}
_PERMUTE_FUNCTIONS = {torch.permute, torch.transpose}
_CAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate}
_PERMUTE_METHODS = {"permute", "transpose"}
# layers met as functional calls (a subclass's own forward, timm's Linear, BatchNormAct2d,
# LayerNorm2d): their arguments by name; parameters come as get_attr nodes
LAYER_ARGS: dict[Any, tuple[str, ...]] = {
    F.linear: ("input", "weight", "bias"),
    **{
        conv: ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        for conv in (F.conv1d, F.conv2d, F.conv3d)
    },
    F.batch_norm: (
        "input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"
    ),
    F.layer_norm: ("input", "normalized_shape", "weight", "bias", "eps"),
    F.group_norm: ("input", "num_groups", "weight", "bias", "eps"),
}  # fmt: skip


def call_args(node: fx.Node) -> dict[str, Any]:
    """A functional layer call's arguments by name (defaults left out)."""
    args = dict(zip(LAYER_ARGS[node.target], node.args))
    args.update(node.kwargs)
    return args


def layer_name(weight: str) -> str:
    """A functional layer's name: its weight's module (``head.fc`` for ``head.fc.weight``)."""
    return weight[: -len(".weight")] if weight.endswith(".weight") else weight


def _known_type(m: nn.Module) -> type[nn.Module] | None:
    """The known torch.nn class whose forward ``m`` runs (subclasses that keep it count)."""
    for cls in _KNOWN_MODULES:
        if isinstance(m, cls) and type(m).forward is cls.forward:
            return cls
    return None


# ---------------------------------------------------------------------------
# results


@dataclass(frozen=True)
class Untransformed:
    """Units that some Linear/Conv layers write but that discovery leaves alone.

    ``writers`` are the modules writing them, ``reasons`` why (the model's
    output, a concatenation, ...); ``expected``: every reason is one no alignment could
    remove (the logits, which reach the model's output)."""

    writers: tuple[str, ...]
    size: int
    reasons: tuple[str, ...]
    expected: bool = False


@dataclass(frozen=True)
class Discovery:
    """What :func:`discover` found: the spec, what it left alone and why."""

    spec: MergeSpec
    untransformed: tuple[Untransformed, ...]
    warnings: tuple[str, ...]
    input_shape: tuple[int, ...]


# ---------------------------------------------------------------------------
# tracing


class _Tracer(fx.Tracer):
    """Records module calls, and which traced-through module takes or returns which node.

    ``leaves`` are module paths kept opaque (ones that could not be traced);
    ``attention``: self-attention layers kept as one call each (discovery's steps).
    When tracing fails, ``failed`` names the innermost traced-through module
    whose forward raised.
    """

    def __init__(self, leaves: set[str], attention: frozenset[str] = frozenset()) -> None:
        super().__init__()
        self.leaves = leaves
        self.attention = attention
        self.calls: Counter[str] = Counter()
        self.inputs_of: dict[fx.Node, list[str]] = {}
        self.outputs_of: dict[fx.Node, list[str]] = {}
        self.failed: tuple[str, BaseException] | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (
            module_qualified_name in self.leaves
            or module_qualified_name in self.attention
            or _known_type(m) is not None
            or super().is_leaf_module(m, module_qualified_name)
        )

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        path = self.path_of_module(m)
        self.calls[path] += 1
        leaf = self.is_leaf_module(m, path)
        try:
            out = super().call_module(m, forward, args, kwargs)
        except Exception as e:
            if self.failed is None and not leaf:
                self.failed = (path, e)
            raise
        if not leaf:
            if args and isinstance(args[0], fx.Proxy):
                self.inputs_of.setdefault(args[0].node, []).append(path)
            if isinstance(out, fx.Proxy):
                self.outputs_of.setdefault(out.node, []).append(path)
        return out


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:160]}" if lines else type(e).__name__


def trace(
    model: nn.Module, attention: frozenset[str] = frozenset()
) -> tuple[fx.Graph, _Tracer, list[str]]:
    """Trace ``model``; submodules that cannot be traced become opaque leaves, and so do
    the self-attention layers named in ``attention``.

    Returns the graph, the tracer (module calls and boundaries) and one
    warning per opaque submodule. Raises :class:`SpecError` when the model's
    own forward cannot be traced.
    """
    leaves: set[str] = set()
    warnings: list[str] = []
    while True:
        tracer = _Tracer(leaves, attention)
        try:
            graph = tracer.trace(model)
        except Exception as e:
            if tracer.failed is None or tracer.failed[0] in leaves:
                raise SpecError(
                    f"torch.fx cannot trace {type(model).__name__}.forward ({_first_line(e)})"
                ) from None
            path, err = tracer.failed
            leaves.add(path)
            kind = type(model.get_submodule(path)).__name__
            warnings.append(
                f"module {path} ({kind}) could not be traced ({_first_line(err)}); it is "
                "treated as an opaque module: units it reads or writes stay untransformed"
            )
            continue
        return graph, tracer, warnings


# ---------------------------------------------------------------------------
# the walk


@dataclass
class _Units:
    """One set of units (a union-find class): members, norms, and why it is frozen."""

    size: int
    writers: list[str] = field(default_factory=list)
    members: list[tuple[str, int]] = field(default_factory=list)
    norms: list[str] = field(default_factory=list)
    # (reason, expected): expected reasons (the model's input/output) give no warning
    frozen: list[tuple[str, bool]] = field(default_factory=list)
    # only permutations keeping ``blocks`` equal blocks are exact (a grouped conv, ...)
    permutation: bool = False
    blocks: int = 1
    parts: list[tuple[int, int]] = field(default_factory=list)  # a concatenation's (uid, size)

    def absorb(self, other: _Units) -> None:
        self.writers += other.writers
        self.members += other.members
        self.norms += other.norms
        self.frozen += other.frozen
        self.restrict(other.permutation, other.blocks)

    def join(self, tensor: str, axis: int, gain: bool = False) -> None:
        """A tensor of the model with one value per unit on ``axis`` joins these units:
        exact under any map when added along axis 0 (a bias), only under permutations
        as a gain or along a later axis (transformed by ``U``, ``M^T`` for those)."""
        self.members.append((tensor, axis))
        if gain or axis >= 1:
            self.restrict()

    def restrict(self, permutation: bool = True, blocks: int = 1) -> None:
        if self.parts and blocks > 1:
            raise _Unsafe("a grouped convolution or GroupNorm of a concatenation")
        self.permutation = self.permutation or permutation
        self.blocks = math.lcm(self.blocks, blocks)


class _Unsafe(Exception):
    """An operation that discovery cannot prove keeps unit identities."""


class _Walk:
    """Assigns every tensor node in ``graph`` a (units class, channel axis) pair."""

    def __init__(
        self,
        model: nn.Module,
        graph: fx.Graph,
        tracer: _Tracer,
        attention: dict[str, AttentionLayout] | None = None,
    ) -> None:
        self.model = model
        self.graph = graph
        self.tracer = tracer
        self.parent: dict[int, int] = {}
        self.units: dict[int, _Units] = {}
        self.value: dict[fx.Node, tuple[int, int]] = {}
        self.activation: set[fx.Node] = set()  # after a nonlinearity, norm or tie
        self.alias: dict[fx.Node, fx.Node] = {}  # identity, dropout (eval): the same values
        self.tensors = model.state_dict(keep_vars=True)
        self.state_names = set(self.tensors)
        self.shared = _shared_tensors(model)
        self.order: dict[str, int] = {}  # writers in graph order
        self.concats: dict[int, str] = {}  # a concatenation's units -> its name
        self.attr_uses = Counter(n.target for n in graph.nodes if n.op == "get_attr")
        self.attention = attention or {}  # recognised self-attention layers by path
        self.aligned_attention: list[str] = []  # those whose heads become groups
        self.items: dict[fx.Node, tuple[int, int]] = {}  # a tuple output's first tensor

    # -- union-find
    def new(self, size: int, frozen: tuple[str, bool] | None = None) -> int:
        uid = len(self.parent)
        self.parent[uid] = uid
        self.units[uid] = _Units(size, frozen=[frozen] if frozen else [])
        return uid

    def find(self, uid: int) -> int:
        while self.parent[uid] != uid:
            self.parent[uid] = self.parent[self.parent[uid]]
            uid = self.parent[uid]
        return uid

    def union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a != b and (self.units[a].parts or self.units[b].parts):
            raise _Unsafe("it adds a concatenation to another tensor")
        if a != b:
            self.parent[b] = a
            self.units[a].absorb(self.units.pop(b))
        return a

    def of(self, node: fx.Node) -> _Units:
        return self.units[self.find(self.value[node][0])]

    # -- helpers
    def shape(self, node: Any) -> tuple[int, ...] | None:
        meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
        return tuple(meta.shape) if isinstance(meta, TensorMetadata) else None

    def set_value(self, node: fx.Node, uid: int, axis: int, activation: bool = False) -> None:
        self.value[node] = (uid, axis)
        if activation:
            self.activation.add(node)

    def fresh(self, node: fx.Node, reason: tuple[str, bool]) -> None:
        """A new, frozen set of units for a tensor that comes from outside the walk."""
        shape = self.shape(node)
        if shape is not None:
            axis = 1 if len(shape) > 1 else 0
            self.value[node] = (self.new(shape[axis] if shape else 1, reason), axis)

    def inputs(self, node: fx.Node) -> list[fx.Node]:
        return [n for n in node.all_input_nodes if n in self.value]

    def run(self) -> None:
        for node in self.graph.nodes:
            if node.op == "placeholder":
                self.fresh(node, ("it is the model's input", True))
            elif node.op == "get_attr":
                self.fresh(node, (f"tensor {node.target} is used directly in forward", False))
            elif node.op == "output":
                for n in self.inputs(node):
                    self.of(n).frozen.append(("it reaches the model's output", True))
            else:
                try:
                    self.step(node)
                except _Unsafe as e:
                    reason = f"{describe(node, self.model)}: {e}"
                    for n in self.inputs(node):
                        self.of(n).frozen.append((reason, False))
                    self.fresh(node, (reason, False))
                    name = self.writer(node)
                    if node in self.value and name is not None:
                        self.of(node).writers.append(name)
                        self.order.setdefault(name, len(self.order))

    def writer(self, node: fx.Node) -> str | None:
        """The name of the Linear/Conv layer ``node`` runs (module or functional), else None."""
        if node.op == "call_module":
            m = self.model.get_submodule(node.target)
            return node.target if _known_type(m) in _WRITERS else None
        layer = node.op == "call_function" and node.target in LAYER_ARGS
        if layer and node.target in (F.linear, F.conv1d, F.conv2d, F.conv3d):
            weight = call_args(node).get("weight")
            if isinstance(weight, fx.Node) and weight.op == "get_attr":
                return layer_name(str(weight.target))
        return None

    def parameter(self, arg: Any, optional: bool = True) -> str | None:
        """The state-dict name of a functional layer's tensor argument (None: not given)."""
        if arg is None and optional:
            return None
        if not (isinstance(arg, fx.Node) and arg.op == "get_attr"):
            raise _Unsafe("its weights are not tensors of the model")
        name = str(arg.target)
        if name not in self.state_names or name in self.shared:
            raise _Unsafe(f"{name} is not one tensor of the state dict (shared or computed)")
        if self.attr_uses[name] > 1:
            raise _Unsafe(f"{name} is used {self.attr_uses[name]} times (weight sharing)")
        return name

    # -- one operation
    def step(self, node: fx.Node) -> None:
        if self.shape(node) is None and _is_shape_query(node):
            return  # x.size(0), x.shape: no values flow
        if node.op == "call_module" and node.target in self.attention:
            self.attention_step(node, self.attention[str(node.target)])
            return
        if node.op == "call_module":
            self.module_step(node, self.model.get_submodule(node.target))
            return
        if node.op == "call_function" and node.target is operator.getitem:
            self.index(node)
            return
        if node.op == "call_function" and node.target in LAYER_ARGS:
            self.functional_layer(node)
            return
        rules: list[tuple[Any, set[str], Any]] = [
            (_ACTIVATION_FUNCTIONS, _ACTIVATION_METHODS, lambda n: self.elementwise(n, True)),
            (_TRANSPARENT_FUNCTIONS, _TRANSPARENT_METHODS, self.transparent),
            (_ARITHMETIC_FUNCTIONS, _ARITHMETIC_METHODS, self.elementwise),
            (_POOL_FUNCTIONS, set(), lambda n: self.pool(n, _POOL_FUNCTIONS[n.target])),
            (_RESHAPE_FUNCTIONS, _RESHAPE_METHODS, self.reshape),
            (_REDUCE_FUNCTIONS, _REDUCE_METHODS, self.reduce),
            (_TIE_FUNCTIONS, _TIE_METHODS, self.tie),
            (_PERMUTE_FUNCTIONS, _PERMUTE_METHODS, self.permute),
            (_CAT_FUNCTIONS, set(), self.concatenate),
        ]
        for functions, methods, handle in rules:
            if node.target in (methods if node.op == "call_method" else functions):
                handle(node)
                return
        raise _Unsafe(_unknown_reason(node))

    def module_step(self, node: fx.Node, m: nn.Module) -> None:
        kind = _known_type(m)
        if kind is None:
            raise _Unsafe("an opaque or unknown module")
        tensors = [n for n, _ in _own_tensors(m)]
        if tensors and self.tracer.calls[node.target] > 1:
            raise _Unsafe(f"called {self.tracer.calls[node.target]} times (weight sharing)")
        names = [_join(node.target, t) for t in tensors]
        shared = [n for n in names if n in self.shared]
        if shared:
            raise _Unsafe(f"{shared[0]} is shared with {self.shared[shared[0]]}")
        if len(node.args) != 1 or node.kwargs:
            raise _Unsafe("called with more than one argument")
        own = [_join(node.target, n) for n in ("weight", "bias") if getattr(m, n, None) is not None]
        if any(n not in self.state_names for n in own):
            raise _Unsafe("its parameters are not in the state dict (parametrized?)")
        own = {n: _join(node.target, n) for n, _ in _own_tensors(m)}
        if kind is nn.Embedding:
            self.embed(node, m, own["weight"])
        elif kind in _WRITERS:
            bias = own.get("bias") if m.bias is not None else None
            groups = getattr(m, "groups", 1)
            self.write(node, node.target, own["weight"], bias, kind is nn.Linear, groups)
        elif kind in BATCHNORMS:
            self.norm(node, list(own.values()), channel_last=False)
            if getattr(m, "running_mean", None) is not None:
                self.of(node).norms.append(node.target)
        elif kind is nn.LayerNorm:
            self.norm(node, list(own.values()), tuple(m.normalized_shape))
        elif kind is nn.GroupNorm:
            self.norm(node, list(own.values()), channel_last=False, groups=m.num_groups)
        elif kind is nn.PReLU:
            if m.num_parameters != 1:
                self.norm(node, list(own.values()), channel_last=False)
            else:
                self.elementwise(node, activation=True)
        elif kind in _ACTIVATION_MODULES:
            self.elementwise(node, activation=True)
        elif kind in _TRANSPARENT_MODULES:
            self.transparent(node)
        elif kind is nn.Flatten:
            self.reshape(node)
        else:
            self.pool(node, _POOL_MODULES[kind])

    def attention_step(self, node: fx.Node, layout: AttentionLayout) -> None:
        """A recognised self-attention layer (models/attention.py): it reads its input's
        units through the fused projection's columns and writes new units through the
        output projection's rows; its heads become the groups ``{path}.values`` and
        ``{path}.scores`` (:func:`_attention_groups`)."""
        path = str(node.target)
        src = node.args[0] if node.args else None
        operands = [a for a in node.args[:3] if isinstance(a, fx.Node)]
        if (
            not isinstance(src, fx.Node)
            or src not in self.value
            or any(a is not src for a in operands)
        ):
            raise _Unsafe("attention of one tensor on another (only self-attention is aligned)")
        if self.tracer.calls[path] > 1:
            raise _Unsafe(f"called {self.tracer.calls[path]} times (weight sharing)")
        shape = self.shape(src)
        uid, axis = self.value[src]
        if shape is None or len(shape) != 3 or axis != 2:
            raise _Unsafe("its input's units are not the last axis of (batch, tokens, units)")
        stream = self.of(src)
        stream.members += [(_join(path, w), 1) for w in layout.weights]
        stream.restrict()  # a residual stream: permutations (exact through its LayerNorms)
        out = _join(path, layout.out)
        self.order.setdefault(out, len(self.order))
        new = self.new(layout.dim)
        self.units[new].writers.append(out)
        self.units[new].members += [(f"{out}.weight", 0)]
        if self.model.get_submodule(out).bias is not None:
            self.units[new].members += [(f"{out}.bias", 0)]
        if self.shape(node) is None:  # nn.MultiheadAttention: (output, weights)
            self.items[node] = (new, 2)
        else:
            self.set_value(node, new, 2)
        self.aligned_attention.append(path)

    def embed(self, node: fx.Node, m: nn.Module, weight: str) -> None:
        """An embedding: new units on the last axis, its table's columns (axis 1)."""
        if m.max_norm is not None:
            raise _Unsafe("an embedding with max_norm renormalises its rows")
        out = self.shape(node)
        assert out is not None
        self.order.setdefault(str(node.target), len(self.order))
        new = self.new(out[-1])
        self.units[new].writers.append(str(node.target))
        self.units[new].members.append((weight, 1))
        self.set_value(node, new, len(out) - 1)

    def index(self, node: fx.Node) -> None:
        """``out[0]`` of an attention layer's (output, weights); ``x[:, 0]``, ``x[:, 1:]``:
        indexing that keeps the units' axis whole moves it past the axes removed."""
        src, idx = node.args[0], node.args[1]
        if src in self.items and idx == 0:
            self.set_value(node, *self.items[src])
            return
        if not isinstance(src, fx.Node) or src not in self.value:
            raise _Unsafe("indexing something else than a tensor")
        shape = self.shape(src)
        idx = idx if isinstance(idx, tuple) else (idx,)
        uid, axis = self.value[src]
        if shape is None or len(idx) > len(shape):
            raise _Unsafe("an index this walk does not know")
        full = slice(None)
        for i, part in enumerate(idx):
            if (i in (0, axis) and part != full) or not isinstance(part, (int, slice)):
                raise _Unsafe("indexing the batch or the units' axis, or by a tensor")
        removed = sum(1 for i, part in enumerate(idx) if isinstance(part, int) and i < axis)
        self.set_value(node, uid, axis - removed)

    def source(self, node: fx.Node, parameters: bool = False) -> fx.Node:
        """The one tensor operand of an elementwise-like operation (``parameters``: the
        other tensors may be the model's own, as a functional layer's weights)."""
        ins = self.inputs(node)
        first = node.args[0] if node.args else None
        if not isinstance(first, fx.Node) or first not in self.value:
            raise _Unsafe("its first operand is not a tensor")
        if any(
            n is not first and self.shape(n) is not None and not (parameters and n.op == "get_attr")
            for n in ins
        ):
            raise _Unsafe("it combines several tensors")
        return first

    def functional_layer(self, node: fx.Node) -> None:
        """``F.linear``, ``F.conv*d``, ``F.batch_norm``, ``F.layer_norm``, ``F.group_norm``
        with the model's tensors as arguments: as the module of that kind."""
        args, fn = call_args(node), node.target
        tensors = [
            self.parameter(args.get(k))
            for k in ("weight", "bias", "running_mean", "running_var")
            if k in LAYER_ARGS[fn]
        ]
        members = [t for t in tensors if t is not None]
        if fn is F.batch_norm:
            self.norm(node, members, channel_last=False)
        elif fn is F.layer_norm:
            self.norm(node, members, tuple(args["normalized_shape"]))
        elif fn is F.group_norm:
            self.norm(node, members, channel_last=False, groups=int(args["num_groups"]))
        else:
            weight = self.parameter(args.get("weight"), optional=False)
            assert weight is not None
            name = layer_name(weight)
            if name in self.order:
                raise _Unsafe(f"layer {name} is written twice")
            groups = int(args.get("groups", 1))
            self.write(node, name, weight, tensors[1], fn is F.linear, groups)

    def elementwise(self, node: fx.Node, activation: bool = False) -> None:
        src = self.source(node)
        if self.shape(node) != self.shape(src):
            raise _Unsafe("it changes the tensor's shape")
        self.set_value(node, *self.value[src], activation=activation)

    def transparent(self, node: fx.Node) -> None:
        """Identity, dropout, ``.contiguous()``: in eval mode the values of its operand."""
        self.elementwise(node)
        src = self.source(node)
        self.alias[node] = self.alias.get(src, src)

    def write(
        self, node: fx.Node, name: str, weight: str, bias: str | None, linear: bool, groups: int
    ) -> None:
        """A Linear/Conv layer ``name``: new units on its output axis, its input units read."""
        src = self.source(node, parameters=True)
        shape, out = self.shape(src), self.shape(node)
        assert shape is not None and out is not None
        uid, axis = self.value[src]
        reads_axis = len(shape) - 1 if linear else 1
        if axis != reads_axis:
            self.of(src).frozen.append(
                (f"{describe(node, self.model)} reads axis {reads_axis}, not the units'", False)
            )
        self.order.setdefault(name, len(self.order))
        if groups != 1 and self.of(src).parts:
            raise _Unsafe("a grouped convolution of a concatenation")
        if groups != 1 and groups == shape[1] == out[1] and axis == 1:  # depthwise
            units = self.of(src)
            units.restrict()
            units.writers.append(name)
            units.members += [(weight, 0)] + ([(bias, 0)] if bias else [])
            self.set_value(node, uid, 1)
            return
        if axis == reads_axis:
            self.of(src).members.append((weight, 1))
            if groups != 1:
                self.of(src).restrict(blocks=groups)
        out_axis = len(out) - 1 if linear else 1
        new = self.new(out[out_axis])
        units = self.units[new]
        if groups != 1:
            units.restrict(blocks=groups)
        units.writers.append(name)
        units.members += [(weight, 0)] + ([(bias, 0)] if bias else [])
        self.set_value(node, new, out_axis)

    def norm(
        self,
        node: fx.Node,
        tensors: list[str],
        normalized: tuple[int, ...] | None = None,
        channel_last: bool = True,
        groups: int = 0,
    ) -> None:
        """A BatchNorm, a GroupNorm of ``groups`` groups (channels on axis 1) or a LayerNorm
        over ``normalized`` (the last axis): the same units; ``tensors`` (its affine
        vectors and running statistics) join them."""
        src = self.source(node, parameters=True)
        shape = self.shape(src)
        assert shape is not None
        uid, axis = self.value[src]
        want = len(shape) - 1 if channel_last else 1
        if axis != want:
            raise _Unsafe(f"it normalises axis {want}, not the units' axis {axis}")
        if channel_last and normalized != (shape[-1],):
            raise _Unsafe(f"it normalises over {normalized}, not one axis")
        units = self.of(src)
        if groups:
            units.restrict(blocks=groups)  # statistics within each group: permutations in it
        for name in tensors:
            t = self.tensors[name]
            if t.ndim == 1 and t.numel() == units.size and t.is_floating_point():
                units.members.append((name, 0))
        self.set_value(node, uid, axis, activation=True)

    def concatenate(self, node: fx.Node) -> None:
        """``torch.cat`` along the units' axis: units made of its parts' units, in order."""
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if not isinstance(tensors, (list, tuple)) or not all(
            isinstance(t, fx.Node) and (t in self.value or _parameter_rows(t)) for t in tensors
        ):
            raise _Unsafe("a concatenation of something else than tensors")
        out = self.shape(node)
        assert out is not None
        axis = int(dim) % len(out)
        if axis == 0:
            raise _Unsafe("a concatenation along the batch axis")
        if any(self.value[t][1] != axis for t in tensors):
            self.join_tokens(node, tensors)
            return
        parts: list[tuple[int, int]] = []
        for t in tensors:
            units = self.of(t)
            parts += units.parts or [(self.find(self.value[t][0]), units.size)]
        uid = self.new(out[axis])
        self.units[uid].parts = parts
        self.concats[uid] = f"concat {node.name}"
        self.set_value(node, uid, axis, activation=True)

    def join_tokens(self, node: fx.Node, tensors: Sequence[fx.Node]) -> None:
        """``torch.cat`` along an axis that is not the units' (tokens: a class token
        before the patches): every part's units are one set, and a model's tensor among
        the parts (``cls_token.expand(B, -1, -1)``) joins them as a gain does."""
        out = self.shape(node)
        assert out is not None
        units_axis = [self.value[t][1] for t in tensors if not _parameter_rows(t)]
        if not units_axis or len(set(units_axis)) != 1:
            raise _Unsafe("a concatenation of tensors with units on different axes")
        axis = units_axis[0]
        uid = None
        for t in tensors:
            if _parameter_rows(t):
                continue
            uid = self.value[t][0] if uid is None else self.union(uid, self.value[t][0])
        assert uid is not None
        units = self.units[self.find(uid)]
        for t in tensors:
            if _parameter_rows(t):
                param = t if t.op == "get_attr" else t.args[0]
                p = self.shape(param)
                assert p is not None
                j = axis - (len(out) - len(p))
                name = self.parameter(param, optional=False)
                if j < 0 or p[j] != out[axis]:
                    raise _Unsafe(f"it concatenates {name} of shape {p} to units on axis {axis}")
                units.join(str(name), j)
        self.set_value(node, uid, axis, activation=True)

    def permute(self, node: fx.Node) -> None:
        """``permute``/``transpose`` keeping the batch axis first: the units move along."""
        src = self.source(node)
        shape = self.shape(src)
        assert shape is not None
        n = len(shape)
        uid, axis = self.value[src]
        rest = list(node.args[1:]) + list(node.kwargs.values())
        if node.target in ("transpose", torch.transpose):
            a, b = (int(d) % n for d in rest[:2])
            dims = list(range(n))
            dims[a], dims[b] = dims[b], dims[a]
        else:
            dims = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
            dims = [int(d) % n for d in dims]
        if len(dims) != n or dims[0] != 0:
            raise _Unsafe("it moves the batch axis")
        self.set_value(node, uid, dims.index(axis))

    def pool(self, node: fx.Node, dims: int) -> None:
        src = self.source(node)
        shape, out = self.shape(src), self.shape(node)
        if out is None or shape is None:
            raise _Unsafe("it does not return one tensor (return_indices?)")
        uid, axis = self.value[src]
        if axis >= len(shape) - dims or len(out) != len(shape) or out[axis] != shape[axis]:
            raise _Unsafe(f"it pools over the units' axis {axis}")
        self.set_value(node, uid, axis)

    def reshape(self, node: fx.Node) -> None:
        src = self.source(node)
        shape, out = self.shape(src), self.shape(node)
        assert shape is not None and out is not None
        uid, axis = self.value[src]
        if shape == out:
            self.set_value(node, uid, axis)
            return
        c = shape[axis]
        keeps = (
            axis == 1
            and len(out) >= 2
            and out[:2] == shape[:2]
            and all(s == 1 for s in shape[2:])
            and all(s == 1 for s in out[2:])
        )
        n = len(shape) - axis  # the units' axis and those after it
        if keeps or out[: axis + 1] == shape[: axis + 1]:  # only later axes change
            self.set_value(node, uid, axis)
        elif axis > 0 and out[0] == shape[0] and tuple(out[-n:]) == shape[axis:]:
            self.set_value(node, uid, len(out) - n)  # only axes between batch and units
        elif axis == 1 and len(out) == 2 and out[1] == c * math.prod(shape[2:]):
            raise _Unsafe(
                f"it flattens {c} channels x {math.prod(shape[2:])} positions into features; "
                "only a 1x1 map can be flattened"
            )
        else:
            raise _Unsafe(f"a reshape {shape} -> {out} that may move the units' axis")

    def reduce(self, node: fx.Node) -> None:
        src = self.source(node)
        shape = self.shape(src)
        assert shape is not None
        uid, axis = self.value[src]
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        keepdim = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
        if dim is None:
            raise _Unsafe("it reduces over all axes")
        dims = {d % len(shape) for d in (dim if isinstance(dim, (list, tuple)) else [dim])}
        if axis in dims or 0 in dims:
            raise _Unsafe("it reduces over the units' or the batch axis")
        new_axis = axis if keepdim else axis - sum(d < axis for d in dims)
        self.set_value(node, uid, new_axis)

    def tie(self, node: fx.Node) -> None:
        operands = [a for a in node.args[:2] if isinstance(a, fx.Node) and a in self.value]
        others = [n for n in self.inputs(node) if n not in operands]
        if others:
            raise _Unsafe("it combines more than two tensors")
        if len(operands) == 1:
            self.elementwise(node)
            return
        a, b = operands
        params = [n for n in operands if n.op == "get_attr"]
        if len(params) == 1:
            self.gain(node, b if a is params[0] else a, params[0])
            return
        if self.shape(a) != self.shape(b):
            a, b = self.broadcast(node, a, b)
        if self.shape(node) != self.shape(a):
            raise _Unsafe(f"it broadcasts {self.shape(a)} with {self.shape(b)}")
        offset = len(self.shape(a) or ()) - len(self.shape(b) or ())  # b's missing axes
        if self.value[a][1] != self.value[b][1] + offset:
            raise _Unsafe("its operands carry units on different axes")
        uid = self.union(self.value[a][0], self.value[b][0])
        self.set_value(node, uid, self.value[a][1], activation=True)

    def broadcast(self, node: fx.Node, a: fx.Node, b: fx.Node) -> tuple[fx.Node, fx.Node]:
        """``(full, broadcast)`` operands of ``a op b`` when one is the other with size-1
        axes besides the batch and the units' (a squeeze-excitation gate: ``x * s``,
        ``s`` of shape (N, C, 1, 1)), or the other without its batch axis (position
        embeddings ``(tokens, units)`` added to ``(batch, tokens, units)``); else unsafe."""
        big, small = (a, b) if self.shape(node) == self.shape(a) else (b, a)
        sb, ss = self.shape(big), self.shape(small)
        axis = self.value[big][1]
        fits = (
            sb is not None
            and ss is not None
            and len(sb) == len(ss)
            and self.value[small][1] == axis
            and all(ss[i] in (1, sb[i]) if i in (0, axis) else ss[i] == 1 for i in range(len(sb)))
            and ss[axis] == sb[axis]
        ) or (
            sb is not None
            and ss is not None
            and len(ss) == len(sb) - 1
            and self.value[small][1] == axis - 1
            and tuple(ss) == tuple(sb[1:])
        )
        if not fits:
            raise _Unsafe(f"it broadcasts {self.shape(a)} with {self.shape(b)}")
        return big, small

    def gain(self, node: fx.Node, src: fx.Node, param: fx.Node) -> None:
        """``x * gamma``, ``x + beta`` with a tensor of the model holding one value per unit
        (layer scale, a bias), or ``x + pos`` with one value per unit and token (position
        embeddings ``(1, tokens, units)``): the same units, the tensor joins them. A gain
        is exact only under permutations, and so is an added tensor whose units are not its
        first axis."""
        shape, p = self.shape(src), self.shape(param)
        uid, axis = self.value[src]
        assert shape is not None and p is not None
        offset = len(shape) - len(p)
        j = axis - offset  # the tensor's axis on the units' axis
        is_add = node.target in (operator.add, operator.iadd, torch.add, "add", "add_")

        def broadcasts(i: int, size: int) -> bool:  # an axis of the tensor but the units'
            return size == 1 or (is_add and i + offset > 0 and size == shape[i + offset])

        fits = (
            0 <= j
            and p[j] == shape[axis]
            and all(broadcasts(i, s) for i, s in enumerate(p) if i != j)
        )
        if not fits or self.shape(node) != shape:
            raise _Unsafe(f"it broadcasts {shape} with the tensor {param.target} of shape {p}")
        name = self.parameter(param, optional=False)
        self.of(src).join(str(name), j, gain=not is_add)
        self.set_value(node, uid, axis)


def _parameter_rows(node: fx.Node) -> bool:
    """A tensor of the model as it is, or expanded over new leading axes (a class token
    ``self.cls_token.expand(x.shape[0], -1, -1)``)."""
    if node.op == "get_attr":
        return True
    return (
        node.op == "call_method"
        and node.target == "expand"
        and isinstance(node.args[0], fx.Node)
        and node.args[0].op == "get_attr"
    )


def _own_tensors(m: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False))


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _shared_tensors(model: nn.Module) -> dict[str, str]:
    """Tensor name -> another name of the same parameter or buffer (tied weights)."""
    by_id: dict[int, list[str]] = {}
    named = list(model.named_parameters(remove_duplicate=False))
    named += list(model.named_buffers(remove_duplicate=False))
    for name, t in named:
        by_id.setdefault(id(t), []).append(name)
    return {
        n: next(o for o in names if o != n)
        for names in by_id.values()
        if len(names) > 1
        for n in names
    }


def _is_shape_query(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in ("size", "dim", "numel")
    return node.target is getattr and node.args[1:] in (("shape",), ("ndim",), ("dtype",))


def _unknown_reason(node: fx.Node) -> str:
    name = getattr(node.target, "__name__", str(node.target))
    if name in ("cat", "concat", "concatenate", "stack", "hstack", "vstack"):
        return "a concatenation"
    if name in ("matmul", "bmm", "mm", "einsum", "scaled_dot_product_attention", "baddbmm"):
        return "a matrix product (matmul/attention)"
    return "an operation not known to keep unit identities"


def describe(node: fx.Node, model: nn.Module) -> str:
    """A node as a user reads it: ``module blocks.0.attn (MultiheadAttention)``, ``torch.cat``..."""
    if node.op == "call_module":
        return f"module {node.target} ({type(model.get_submodule(node.target)).__name__})"
    if node.op == "call_method":
        what = f".{node.target}()"
    else:
        target = node.target
        mod = getattr(target, "__module__", None) or ""
        mod = {"torch.nn.functional": "F", "_operator": "operator"}.get(mod, mod)
        name = getattr(target, "__name__", str(target))
        what = f"{mod}.{name}" if mod else name
    stack = node.meta.get("nn_module_stack") or {}
    where = f" in {next(reversed(stack.values()))[0]}" if stack else ""
    return f"{what} (node {node.name}{where})"


# ---------------------------------------------------------------------------
# collection points


def _hook_with_axis(node: fx.Node, walk: _Walk, tracer: _Tracer) -> tuple[str, str, int] | None:
    """The best module hook that sees ``node``'s value, with the units' axis (1, or -1
    for the last axis of a tensor of 3 or more), or None."""
    shape = walk.shape(node)
    if not shape or len(shape) < 2:
        return None
    axis = walk.value[node][1] % len(shape)
    found = _hooks(node, tracer) if axis in (1, len(shape) - 1) else []
    return (*found[0], 1 if axis == 1 else -1) if found else None


def _hooks(node: fx.Node, tracer: _Tracer) -> list[tuple[str, str]]:
    """Module hooks that see exactly ``node``'s value, best first (modules called once)."""
    out: list[tuple[str, str]] = []
    if node.op == "call_module" and tracer.calls[node.target] == 1:
        out.append((node.target, "output"))
    out += [(p, "output") for p in tracer.outputs_of.get(node, []) if tracer.calls[p] == 1]
    for user in node.users:
        if user.op == "call_module" and user.args and user.args[0] is node:
            if tracer.calls[user.target] == 1:
                out.append((user.target, "input"))
    out += [(p, "input") for p in tracer.inputs_of.get(node, []) if tracer.calls[p] == 1]
    return out


def _collection_point(
    nodes: list[fx.Node], walk: _Walk, tracer: _Tracer
) -> tuple[tuple[str, str, int] | None, str | None]:
    """Where to read a group whose tensors are ``nodes`` (graph order): (module, "input" or
    "output", the units' axis: 1, or -1 for channels-last), and a warning or None.

    The group's activations are its last tensor after a nonlinearity, norm or
    addition (or an identity/dropout of it). When no module sees that tensor,
    the first later view of it that a module sees (pooled, flattened, scaled)
    is used, else the latest earlier tensor. The units must be the tensor's axis 1
    or its last axis.
    """
    values: dict[fx.Node, tuple[str, str, int] | None] = {}  # distinct values, graph order
    for n in nodes:
        key = walk.alias.get(n, n)
        if values.get(key) is None:
            values[key] = _hook_with_axis(n, walk, tracer)
    keys = list(values)
    acts = [i for i, k in enumerate(keys) if k in walk.activation]
    last = acts[-1] if acts else len(keys) - 1
    if values[keys[last]] is not None:
        return values[keys[last]], None
    later = [k for k in keys[last + 1 :] if values[k] is not None]
    earlier = [k for k in keys[:last] if values[k] is not None]
    chosen = later[0] if later else (earlier[-1] if earlier else None)
    if chosen is None:
        return None, None
    hook = values[chosen]
    assert hook is not None
    return hook, (
        f"no module sees its activations at node {keys[last].name}; collecting the "
        f"{hook[1]} of {hook[0]} (node {chosen.name}) instead"
    )


# ---------------------------------------------------------------------------
# the entry point


def infer_input_shape(graph: fx.Graph, model: nn.Module) -> tuple[int, ...] | None:
    """``(in_features,)`` when the input reaches only Linear layers (through flatten/view)."""
    features: set[int] = set()
    todo = [n for n in graph.nodes if n.op == "placeholder"][:1]
    while todo:
        node = todo.pop()
        for user in node.users:
            if user.op == "call_module":
                m = model.get_submodule(user.target)
                if isinstance(m, nn.Linear):
                    features.add(m.in_features)
                    continue
                if not isinstance(m, (nn.Flatten,) + _TRANSPARENT_MODULES):
                    return None
            elif user.target in ("size", "dim") or user.target is getattr:
                continue  # a shape query
            elif user.target not in _RESHAPE_METHODS and user.target not in _RESHAPE_FUNCTIONS:
                return None
            todo.append(user)
    return (features.pop(),) if len(features) == 1 else None


def feeds_embedding(graph: fx.Graph, model: nn.Module) -> bool:
    """Whether the input goes straight into an embedding (token ids)."""
    for node in [n for n in graph.nodes if n.op == "placeholder"][:1]:
        for user in node.users:
            if user.op == "call_module":
                if isinstance(model.get_submodule(str(user.target)), nn.Embedding):
                    return True
            elif user.op == "call_function" and user.target is F.embedding:
                return True
    return False


def guess_input_shape(model: nn.Module) -> tuple[int, ...] | None:
    """``(in_features,)`` when ``model``'s input feeds only Linear layers; None otherwise
    (also when the model cannot be traced)."""
    try:
        graph, _, _ = trace(model)
    except SpecError:
        return None
    return infer_input_shape(graph, model)


def discover(
    model: nn.Module, input_shape: Sequence[int] | None = None, tokens: bool = False
) -> Discovery:
    """Trace ``model`` and return its feature groups.

    ``input_shape`` is one sample's shape (e.g. ``(3, 32, 32)``); without it,
    it is inferred only when the input feeds a Linear layer. The shapes are propagated
    on two samples of random floats, or of token id 0 when the inputs are integer token
    ids (``tokens``, or the input goes straight into an embedding). Raises
    :class:`SpecError` when the model cannot be traced or run on that shape.
    """
    was_training = model.training
    model.eval()
    try:
        attention = {
            path: layout
            for path, m in model.named_modules()
            if (layout := attention_layout(m)) is not None
        }
        try:
            graph, tracer, warnings = trace(model, frozenset(attention))
        except SpecError as e:  # groups written by hand would do (each command says how)
            raise SpecError(str(e), missing="spec") from None
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        required = [n for n in placeholders if not n.args]
        if len(required) != 1:
            raise SpecError(
                f"{type(model).__name__}.forward takes {len(required)} required inputs; "
                "discovery handles models with exactly one"
            )
        if input_shape is None:
            input_shape = infer_input_shape(graph, model)
            if input_shape is None:
                raise SpecError(
                    f"cannot tell the input shape of {type(model).__name__}",
                    missing="input_shape",
                )
        input_shape = tuple(int(s) for s in input_shape)
        param = next((p for p in model.parameters() if p.is_floating_point()), None)
        dtype = param.dtype if param is not None else torch.float32
        device = param.device if param is not None else "cpu"
        if tokens or feeds_embedding(graph, model):  # any vocabulary has id 0
            example = torch.zeros(2, *input_shape, dtype=torch.int64, device=device)
        else:
            generator = torch.Generator().manual_seed(0)
            example = torch.randn(2, *input_shape, dtype=dtype, generator=generator).to(device)
        gm = fx.GraphModule(model, graph)
        try:  # ShapeProp prints a traceback to stderr before raising: the error says it all
            with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
                ShapeProp(gm).propagate(example)
        except Exception as e:
            cause = e.__cause__ or e
            raise SpecError(
                f"running {type(model).__name__} on samples of shape {input_shape} failed "
                f"({_first_line(cause)})"
            ) from None
    finally:
        model.train(was_training)

    walk = _Walk(model, graph, tracer, attention)
    walk.run()
    return _result(walk, tracer, input_shape, warnings)


def _concats(walk: _Walk, groups: set[str]) -> tuple[Concat, ...]:
    """The concatenations that layers read, their parts named by group (None: a part
    left untransformed)."""
    out = []
    for uid, name in walk.concats.items():
        units = walk.units[uid]
        if units.frozen or not units.members:
            continue
        parts = []
        for part, size in units.parts:
            writers = walk.units[walk.find(part)].writers
            parts.append((writers[0] if writers and writers[0] in groups else None, size))
        if any(p is not None for p, _ in parts):
            out.append(Concat(name, tuple(parts), tuple(dict.fromkeys(units.members))))
    return tuple(out)


def _attention_groups(walk: _Walk) -> tuple[list[FeatureGroup], tuple[Concat, ...]]:
    """Each self-attention layer's values and scores (groups of heads, the second in the
    first's head order): the value rows and the output projection's columns, the query
    and key rows (both by the scores' maps); a fused projection's rows are their
    concatenation (queries, keys, values)."""
    groups, fused = [], []
    for path in walk.aligned_attention:
        layout = walk.attention[path]
        d, heads, out = layout.dim, layout.heads, _join(path, layout.out)
        rows = [
            tuple((_join(path, t), 0) for t in (w, b) if t is not None)
            for w, b in zip(layout.weights, layout.biases)
        ]
        q, k, v = ((), (), ()) if layout.fused else rows
        values = FeatureGroup(
            f"{path}.values", d, (*v, (f"{out}.weight", 1)), out, "input", -1, heads=heads
        )
        scores = FeatureGroup(
            f"{path}.scores", d, (*q, *k), _join(path, layout.queries_at), "output", -1,
            heads=heads, follows=values.name, collect_from=0 if layout.fused else None,
        )  # fmt: skip
        if layout.fused:
            parts = ((scores.name, d), (scores.name, d), (values.name, d))
            fused.append(Concat(f"{path}.qkv", parts, rows[0]))
        groups += [values, scores]
    return groups, tuple(fused)


def _result(
    walk: _Walk, tracer: _Tracer, input_shape: tuple[int, ...], warnings: list[str]
) -> Discovery:
    nodes_of: dict[int, list[fx.Node]] = {}
    for node in walk.graph.nodes:
        if node in walk.value:
            nodes_of.setdefault(walk.find(walk.value[node][0]), []).append(node)
    order = walk.order
    for uid in walk.concats:  # a concatenation frozen or kept to permutations: its parts too
        for part, _ in walk.units[uid].parts:
            walk.units[walk.find(part)].frozen += walk.units[uid].frozen
            if walk.units[uid].permutation:
                walk.units[walk.find(part)].restrict()
    for units in walk.units.values():
        units.writers.sort(key=order.__getitem__)
    groups: list[FeatureGroup] = []
    untransformed: list[Untransformed] = []
    ranked = sorted(
        (item for item in walk.units.items() if item[1].writers),
        key=lambda item: order[item[1].writers[0]],
    )
    for uid, units in ranked:
        hook, note = (None, None)
        if not units.frozen:
            hook, note = _collection_point(nodes_of.get(uid, []), walk, tracer)
            if hook is None:
                units.frozen.append(
                    ("no module sees its activations with the units on axis 1 or last", False)
                )
        if units.frozen:
            reasons = tuple(dict.fromkeys(r for r, _ in units.frozen))
            # the logits are expected to stay; a residual stream tied to them is worth a word
            unexpected = [r for r, expected in units.frozen if not expected]
            writers = tuple(units.writers)
            untransformed.append(Untransformed(writers, units.size, reasons, not unexpected))
            if unexpected or len(units.writers) > 1:
                warnings.append(
                    f"units written by {', '.join(units.writers)} stay untransformed: "
                    + "; ".join(dict.fromkeys(unexpected or reasons))
                )
            continue
        if note:
            warnings.append(f"group {units.writers[0]}: {note}")
        assert hook is not None
        groups.append(
            FeatureGroup(
                name=units.writers[0],
                size=units.size,
                members=tuple(dict.fromkeys(units.members)),
                collect_at=hook[0],
                collect_on=hook[1],  # type: ignore[arg-type]
                collect_axis=hook[2],
                norms=tuple(units.norms),
                permutation=units.permutation,
                blocks=units.blocks,
            )
        )
    heads, fused = _attention_groups(walk)
    warnings = list(dict.fromkeys(warnings))
    for w in warnings:
        log.warning("%s", w)
    return Discovery(
        MergeSpec((*groups, *heads), _concats(walk, {g.name for g in groups}) + fused),
        tuple(dict.fromkeys(untransformed)),
        tuple(warnings),
        input_shape,
    )
