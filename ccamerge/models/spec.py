"""Feature groups: which tensor axes index the same hidden units.

An architecture's symmetry is data. A :class:`MergeSpec` lists its
:class:`FeatureGroup` objects; each group names the ``(tensor, axis)`` pairs
that index its ``size`` units and the module where its activations are read on
calibration data. Merge methods see nothing else of the architecture.

Axis roles follow PyTorch's layouts: axis 0 of a tensor is an *output* axis
(a Linear/Conv weight's rows, a bias, a BatchNorm vector) and is transformed
by ``M`` (``W -> M W``); axis 1 is an *input* axis and is transformed by ``U``
(``W -> W U``); a later axis is transformed by ``U`` along it (a ViT's position
embeddings ``(1, positions, d)`` on axis 2: for the permutations such groups take,
``U = M^T`` moves the units as ``M`` does). Axes not listed are left alone (conv
kernels' spatial axes, the network's input and its logits).

Some layers can follow only some maps exactly: a depthwise or grouped convolution,
a GroupNorm and a per-channel gain (layer scale) keep their function under a
permutation of their channels (within each conv or norm group), not under a dense
map. Such a group says so: ``permutation`` (its maps are permutations) and
``blocks`` (they keep units within ``blocks`` equal, consecutive blocks);
:func:`ccamerge.pipeline.align.constrain` turns any method's maps into such
permutations. A grouped convolution's input axis holds one block's units
(``size / blocks`` of them) and is transformed block by block.

Attention heads are units of their own (docs/transformers.md): a group with ``heads``
takes maps that permute whole heads and map each head's units by a block of their own.
An attention layer has two such groups: its value/output space (dense blocks: any
invertible map of a head's values is undone by the output projection), and its
query/key space, which ``follows`` the first (its heads in the same order) and takes
orthogonal blocks (the query rows and the key rows are both mapped by ``M``, which
keeps every score ``q . k`` when ``M`` is orthogonal). ``collect_from``, when given, is
the index of the group's first unit in the collected tensor (a fused query/key/value
projection's output holds the query units first).

A transformer's residual stream read only through norms (pre-norm blocks) can take more
than permutations: once each norm's gain and bias are folded into the layers that read
it (a :class:`NormFold`), the norm commutes with every orthogonal map that keeps the
all-ones direction (LayerNorm's mean removal and scaling, RMSNorm's scaling), so the
stream is ``orthogonal``: its maps are made such maps (docs/transformers.md).

Under grouped-query attention several query heads share one key/value head: the query
rows and the output projection's columns hold, for each key/value head, one copy of its
units per query head that reads it. A :class:`HeadCopies` names those axes; they take
the map of the group of key/value heads they copy, applied to every copy.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..runtime.errors import SpecError

CollectOn = Literal["input", "output"]


@dataclass(frozen=True)
class FeatureGroup:
    """One feature space of ``size`` units.

    ``members`` are ``(tensor_name, axis)`` pairs; ``collect_at`` is a module
    name (as in ``model.named_modules()``) and ``collect_on`` says whether the
    group's activations are that module's input or its output; ``collect_axis``
    is the units' axis in that tensor: 1 (``(B, C, ...)``, the default) or -1
    (channels-last ``(B, ..., C)``, as a Linear applied to every position sees
    it). ``norms`` names the BatchNorm modules whose outputs lie in this group
    (their running statistics are recomputed after a merge). A group of ``heads``
    (attention) is mapped head by head; ``follows`` another group of heads, it takes that
    group's order of heads; ``whole_heads``: the units within each head keep their
    order (rotary position embeddings act on them), only whole heads move.
    ``orthogonal``: the maps are orthogonal and keep the all-ones direction (a residual
    stream whose norms are folded, :class:`NormFold`).
    """

    name: str
    size: int
    members: tuple[tuple[str, int], ...]
    collect_at: str
    collect_on: CollectOn = "output"
    collect_axis: int = 1
    norms: tuple[str, ...] = ()
    permutation: bool = False
    blocks: int = 1
    heads: int = 1
    follows: str | None = None
    collect_from: int | None = None
    whole_heads: bool = False
    orthogonal: bool = False

    def __post_init__(self) -> None:
        for _, axis in self.members:
            if not isinstance(axis, int) or axis < 0:
                raise SpecError(f"group {self.name}: axis {axis} is not 0 (output) or >= 1 (input)")
        if self.collect_axis not in (1, -1):
            raise SpecError(f"group {self.name}: collect_axis {self.collect_axis} is not 1 or -1")
        if self.blocks < 1 or self.size % self.blocks:
            raise SpecError(f"group {self.name}: {self.blocks} blocks do not divide {self.size}")
        if self.blocks > 1 and not self.permutation:
            raise SpecError(f"group {self.name}: blocks are only kept by permutations")
        if self.heads < 1 or self.size % self.heads or (self.heads > 1 and self.blocks > 1):
            raise SpecError(f"group {self.name}: {self.heads} heads do not divide {self.size}")
        if self.follows is not None and self.heads == 1:
            raise SpecError(f"group {self.name}: only a group of heads follows another")
        if self.whole_heads and self.heads == 1:
            raise SpecError(f"group {self.name}: whole_heads needs heads")
        if self.orthogonal and (self.permutation or self.heads > 1 or self.size < 2):
            raise SpecError(f"group {self.name}: orthogonal maps are for a plain group")


@dataclass(frozen=True)
class Concat:
    """A concatenation of feature groups along the units' axis (a DenseNet's
    ``torch.cat``): its ``members`` (the layers reading it, a BatchNorm on it) are
    transformed by the block-diagonal map of its ``parts``' maps, each part a group
    name and its size (None: units that stay untransformed, an identity block). It is
    not aligned itself; methods see only the groups."""

    name: str
    parts: tuple[tuple[str | None, int], ...]
    members: tuple[tuple[str, int], ...]

    @property
    def size(self) -> int:
        return sum(n for _, n in self.parts)


@dataclass(frozen=True)
class HeadCopies:
    """The units of a ``group`` of heads, each head repeated ``copies`` times in a row
    along the axes of ``members`` (grouped-query attention: head ``h`` of those axes is
    head ``h // copies`` of the group; a group without ``heads`` is one head). They are
    transformed by the group's maps, one block per copy
    (:func:`ccamerge.maths.algebra.expand_heads`); not aligned themselves."""

    name: str
    group: str
    copies: int
    members: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class NormFold:
    """A norm (weight: its gain, optional bias, on its units' axis 0) whose affine part
    the Linear modules ``readers`` (every layer reading its output) take over: each
    reader's weight becomes ``W diag(gain)`` and its bias ``bias + W norm_bias``, the
    norm's gain 1 and bias 0 (:func:`ccamerge.maths.algebra.fold_norms`): the same
    function, with a norm that commutes with an ``orthogonal`` group's maps."""

    norm: str
    readers: tuple[str, ...]


@dataclass(frozen=True)
class MergeSpec:
    """All feature groups of one architecture configuration, the concatenations of
    groups that layers read, the copies of groups of heads and the norms folded into
    their readers before anything is aligned."""

    groups: tuple[FeatureGroup, ...]
    concats: tuple[Concat, ...] = ()
    copies: tuple[HeadCopies, ...] = ()
    folds: tuple[NormFold, ...] = ()
    axes: Mapping[str, Mapping[int, str]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        axes: dict[str, dict[int, str]] = {}
        names = set()
        known = {g.name for g in self.groups}
        for c in self.concats:
            unknown = [p for p, _ in c.parts if p is not None and p not in known]
            if unknown:
                raise SpecError(f"concatenation {c.name}: unknown part {unknown[0]!r}")
        for c in self.copies:
            source = next((g for g in self.groups if g.name == c.group), None)
            if source is None or c.copies < 1:
                raise SpecError(f"head copies {c.name}: no group {c.group!r} to copy")
        for g in (*self.groups, *self.concats, *self.copies):
            if g.name in names:
                raise SpecError(f"duplicate group name {g.name!r}")
            leader = getattr(g, "follows", None)
            if leader is not None and not any(
                f.name == leader and f.name in names and f.heads == g.heads for f in self.groups
            ):
                raise SpecError(f"group {g.name} follows {leader!r}: no earlier group of heads")
            names.add(g.name)
            for tensor, axis in g.members:
                slot = axes.setdefault(tensor, {})
                if axis in slot:
                    raise SpecError(
                        f"{tensor} axis {axis} is in two groups: {slot[axis]!r} and {g.name!r}"
                    )
                slot[axis] = g.name
        object.__setattr__(self, "axes", axes)

    def group(self, name: str) -> FeatureGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)

    def size_of(self, name: str) -> int:
        """The units of a group, a concatenation or a group's head copies."""
        for c in self.copies:
            if c.name == name:
                return self.group(c.group).size * c.copies
        for c in self.concats:
            if c.name == name:
                return c.size
        return self.group(name).size

    @property
    def sizes(self) -> dict[str, int]:
        return {g.name: g.size for g in self.groups}

    def validate(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Check every member tensor exists and has the group's size on its axis, and that
        every fold's norm and readers exist (a reader with a bias where the norm has one)."""
        for f in self.folds:
            gain = state_dict.get(f"{f.norm}.weight")
            if gain is None or gain.dim() != 1:
                raise SpecError(f"fold of {f.norm}: no gain {f.norm}.weight")
            for r in f.readers:
                weight = state_dict.get(f"{r}.weight")
                if weight is None or weight.dim() != 2 or weight.shape[1] != gain.numel():
                    raise SpecError(f"fold of {f.norm}: {r}.weight does not read its units")
                if f"{f.norm}.bias" in state_dict and f"{r}.bias" not in state_dict:
                    raise SpecError(f"fold of {f.norm}: {r} has no bias to take the norm's")
        for g in (*self.groups, *self.concats, *self.copies):
            size = self.size_of(g.name)
            for tensor, axis in g.members:
                if tensor not in state_dict:
                    raise SpecError(f"group {g.name}: tensor {tensor} is missing")
                shape = tuple(state_dict[tensor].shape)
                blocks = getattr(g, "blocks", 1)
                sizes = (size, size // blocks) if axis == 1 else (size,)
                if axis >= len(shape) or shape[axis] not in sizes:
                    raise SpecError(
                        f"group {g.name}: {tensor} has shape {shape}, "
                        f"expected size {size} on axis {axis}"
                    )


class SpecBuilder:
    """Small helpers that make an architecture's spec a few lines.

    Each helper adds members to a named group (created on first use);
    ``build()`` returns the :class:`MergeSpec`.
    """

    def __init__(self) -> None:
        self._members: dict[str, list[tuple[str, int]]] = {}
        self._sizes: dict[str, int] = {}
        self._collect: dict[str, tuple[str, CollectOn]] = {}
        self._norms: dict[str, list[str]] = {}

    def _add(self, group: str, size: int, tensor: str, axis: int) -> None:
        if group in self._sizes and self._sizes[group] != size:
            raise SpecError(f"group {group}: size {size} != {self._sizes[group]}")
        self._sizes[group] = size
        self._members.setdefault(group, []).append((tensor, axis))

    def writes(self, group: str, size: int, module: str, bias: bool = True) -> None:
        """A Linear/Conv module whose output channels are ``group``."""
        self._add(group, size, f"{module}.weight", 0)
        if bias:
            self._add(group, size, f"{module}.bias", 0)

    def reads(self, group: str, size: int, module: str) -> None:
        """A Linear/Conv module whose input channels are ``group``."""
        self._add(group, size, f"{module}.weight", 1)

    def norm(self, group: str, size: int, module: str, running: bool = True) -> None:
        """A BatchNorm (``running=True``) or LayerNorm-like affine module on ``group``."""
        for p in ("weight", "bias") + (("running_mean", "running_var") if running else ()):
            self._add(group, size, f"{module}.{p}", 0)
        if running:
            self._norms.setdefault(group, []).append(module)

    def collect(self, group: str, module: str, on: CollectOn = "output") -> None:
        """Where the group's activations are read."""
        self._collect[group] = (module, on)

    def build(self) -> MergeSpec:
        groups = []
        for name, members in self._members.items():
            if name not in self._collect:
                raise SpecError(f"group {name} has no collection point")
            module, on = self._collect[name]
            groups.append(
                FeatureGroup(
                    name=name,
                    size=self._sizes[name],
                    members=tuple(members),
                    collect_at=module,
                    collect_on=on,
                    norms=tuple(self._norms.get(name, ())),
                )
            )
        return MergeSpec(tuple(groups))
