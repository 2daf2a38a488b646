"""What every merge method shares: its inputs, its result, and the method registry.

A method is a small dataclass whose fields are its parameters. ``align``
returns, per feature group and per model k, ``M_k`` (model -> shared space)
and ``U_k`` (back), both d x d float64, plus the quality score the method
optimised (e.g. mean canonical correlation), so reports can show where the
models disagree.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..maths.stats import Statistics
from ..models.spec import MergeSpec
from ..runtime.errors import OptionError


@dataclass
class AlignContext:
    """Everything a method may look at."""

    spec: MergeSpec
    state_dicts: Sequence[Mapping[str, torch.Tensor]]
    reference: int = 0
    stats: Statistics | None = None

    @property
    def n_models(self) -> int:
        return len(self.state_dicts)


@dataclass
class GroupAlignment:
    """Transforms of one group: ``M[k]``, ``U[k]`` (d x d float64) for each model k.

    ``quality[k]`` is the mean score the method optimised between the
    reference and model k (None for the reference itself); ``details`` holds
    further diagnostics (minimum correlation, condition numbers, ...).
    """

    M: list[torch.Tensor]
    U: list[torch.Tensor]
    quality: list[float | None] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Alignment:
    groups: dict[str, GroupAlignment]

    def model_transforms(self, k: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``(M, U)`` dictionaries group -> matrix for model k."""
        return (
            {g: a.M[k] for g, a in self.groups.items()},
            {g: a.U[k] for g, a in self.groups.items()},
        )


class MergeMethod:
    """Base class: subclasses are dataclasses, registered with :func:`register_method`."""

    name: ClassVar[str]
    needs_data: ClassVar[bool] = True
    description: ClassVar[str] = ""
    # True when every M_k is a permutation (U_k = M_k^T): a single aligned model is then
    # the same function, and BatchNorm vectors may be transformed like any other tensor
    permutation_only: ClassVar[bool] = False

    def align(self, ctx: AlignContext) -> Alignment:
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        return dataclasses.asdict(self) if dataclasses.is_dataclass(self) else {}


_METHODS: dict[str, type[MergeMethod]] = {}


def register_method(cls: type[MergeMethod]) -> type[MergeMethod]:
    if cls.name in _METHODS:
        raise ValueError(f"method {cls.name!r} is already registered")
    _METHODS[cls.name] = cls
    return cls


def list_methods() -> list[str]:
    return sorted(_METHODS)


def method_parameters(name: str) -> set[str]:
    """The parameter names method ``name`` takes."""
    if name not in _METHODS:
        raise OptionError(f"unknown method {name!r} (known: {', '.join(list_methods())})")
    cls = _METHODS[name]
    return {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()


def make_method(name: str, **params: Any) -> MergeMethod:
    """Instantiate method ``name``; parameters it does not take are an error."""
    extra = sorted(set(params) - method_parameters(name))
    if extra:
        raise OptionError(f"method {name!r} takes no parameter {', '.join(extra)}")
    for key, value in params.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise OptionError(f"method {name!r}: {key} must be a finite number, got {value}")
    try:
        return _METHODS[name](**params)
    except (TypeError, ValueError) as e:
        raise OptionError(f"method {name!r}: {e}") from None


def identity_alignment(spec: MergeSpec, n_models: int) -> Alignment:
    return Alignment(
        {
            g.name: GroupAlignment(
                M=[torch.eye(g.size, dtype=torch.float64) for _ in range(n_models)],
                U=[torch.eye(g.size, dtype=torch.float64) for _ in range(n_models)],
                quality=[None] * n_models,
            )
            for g in spec.groups
        }
    )
