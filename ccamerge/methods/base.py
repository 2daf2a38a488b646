"""What every merge method shares: its inputs, its result, and the method registry.

A method is a class that declares its parameters (:class:`Param`: name,
type, default, help, valid range, the candidates ``auto`` searches) and is
registered with :func:`register_method`; the registry is what the command line,
the automatic selection and the tests read. ``align`` returns, per feature group and per model k, ``M_k`` (model -> shared space)
and ``U_k`` (back), both d x d float64, plus the quality score the method
optimised (e.g. mean canonical correlation), so reports can show where the
models disagree.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..maths.stats import Statistics
from ..models.spec import MergeSpec
from ..runtime.errors import OptionError

AUTO = "auto"  # a parameter value: search the parameter's declared candidates
_KINDS = {float: "a finite number", int: "an integer", bool: "true or false", str: "a string"}
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


@dataclass(frozen=True)
class Param:
    """One declared parameter of a merge method.

    ``type``: float, int, bool or str. ``low``/``high``: the closed range a number
    must lie in (None: unbounded); ``choices``: the values a str may take (empty:
    any). ``candidates``: the values ``auto`` tries, best chosen on held-out data
    (empty: ``auto`` is refused). ``default_with_refit``/``default_without_refit``:
    a merge's default when it differs from ``default`` (which ``make_method`` and
    ``barrier`` use), e.g. ``"auto"``."""

    name: str
    type: type
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()
    candidates: tuple[Any, ...] = ()
    default_with_refit: Any = None
    default_without_refit: Any = None

    def __post_init__(self) -> None:
        if self.type not in _KINDS:
            raise ValueError(f"parameter {self.name}: type must be float, int, bool or str")

    def kind(self, auto: bool = True) -> str:
        """What a value must be, in words ("a finite number or 'auto'"); ``auto``: say
        'auto' where candidates are declared."""
        words = " or ".join(self.choices) if self.choices else _KINDS[self.type]
        return f"{words} or '{AUTO}'" if auto and self.candidates else words

    def limits(self) -> str:
        """The range in words ('in [0, 1]', '>= 1'; '' when unbounded)."""
        if self.low is not None and self.high is not None:
            return f"in [{self.low:g}, {self.high:g}]"
        if self.low is not None:
            return f">= {self.low:g}"
        return f"<= {self.high:g}" if self.high is not None else ""

    def convert(self, value: Any) -> Any:
        """``value`` as the declared type, checked; ValueError('must ..., got ...')."""
        if self.type is bool:
            if not isinstance(value, bool):
                raise ValueError(f"must be true or false, got {value!r}")
            return value
        if self.type is str:
            if not isinstance(value, str) or (self.choices and value not in self.choices):
                raise ValueError(f"must be {self.kind(auto=False)}, got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"must be a finite number, got {value}")
        if self.type is int:
            if int(value) != value:
                raise ValueError(f"must be an integer, got {value}")
            value = int(value)
        else:
            value = float(value)
        if (self.low is not None and value < self.low) or (
            self.high is not None and value > self.high
        ):
            verb = "lie" if self.low is not None and self.high is not None else "be"
            raise ValueError(f"must {verb} {self.limits()}, got {value}")
        return value

    def parse(self, text: str) -> Any:
        """Command-line text as a value (``'auto'`` where candidates are declared);
        ValueError('expects ..., got ...') when it is not one, ('must ...') when
        out of range."""
        if text == AUTO and self.candidates:
            return AUTO
        try:
            if self.type is bool:
                if text.lower() not in _TRUE + _FALSE:
                    raise ValueError
                value: Any = text.lower() in _TRUE
            elif self.type is str:
                value = text
            else:
                value = self.type(text)
                if not math.isfinite(value):
                    raise ValueError
        except ValueError:
            raise ValueError(f"expects {self.kind()}, got {text!r}") from None
        return self.convert(value)


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
    """Base class of the merge methods, registered with :func:`register_method`.

    A method declares its parameters in ``parameters`` (:class:`Param`); the
    constructor takes them as keyword arguments, checks them against the
    declarations and sets them as attributes (``self.gamma``)."""

    name: ClassVar[str]
    needs_data: ClassVar[bool] = True
    description: ClassVar[str] = ""
    # True when every M_k is a permutation (U_k = M_k^T): a single aligned model is then
    # the same function, and BatchNorm vectors may be transformed like any other tensor
    permutation_only: ClassVar[bool] = False
    # True for the methods `--method auto` chooses among
    auto_candidate: ClassVar[bool] = False
    parameters: ClassVar[tuple[Param, ...]] = ()

    def __init__(self, **params: Any) -> None:
        unknown = sorted(set(params) - {p.name for p in self.parameters})
        if unknown:
            raise TypeError(f"{type(self).__name__} takes no parameter {', '.join(unknown)}")
        for p in self.parameters:
            value = params.get(p.name, p.default)
            try:
                setattr(self, p.name, p.convert(value))
            except ValueError as e:
                raise ValueError(f"{p.name} {e}") from None

    def align(self, ctx: AlignContext) -> Alignment:
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        """The parameters' values, in the order of the declarations."""
        return {p.name: getattr(self, p.name) for p in self.parameters}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.params().items())})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.params() == self.params()

    __hash__ = None  # type: ignore[assignment]


_METHODS: dict[str, type[MergeMethod]] = {}


def register_method(cls: type[MergeMethod]) -> type[MergeMethod]:
    """Register a merge method (use as a class decorator); its declarations are checked."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name or name == "auto":
        raise ValueError(f"{cls.__name__}: a method needs a name (a non-empty string, not 'auto')")
    if name in _METHODS:
        raise ValueError(f"method {name!r} is already registered")
    names = [p.name for p in cls.parameters]
    if len(set(names)) != len(names):
        raise ValueError(f"method {name!r} declares a parameter twice: {', '.join(names)}")
    for p in cls.parameters:
        values = [p.default, *p.candidates]
        values += [v for v in (p.default_with_refit, p.default_without_refit) if v is not None]
        for value in values:
            if value != AUTO:
                try:
                    p.convert(value)
                except ValueError as e:
                    raise ValueError(f"method {name!r}: declared {p.name} {e}") from None
            elif not p.candidates:
                raise ValueError(f"method {name!r}: {p.name} defaults to 'auto' without candidates")
    _METHODS[name] = cls
    return cls


def unregister_method(name: str) -> None:
    _METHODS.pop(name, None)


def list_methods() -> list[str]:
    return sorted(_METHODS)


def method_class(name: str) -> type[MergeMethod]:
    """The registered class of method ``name``."""
    if name not in _METHODS:
        raise OptionError(f"unknown method {name!r} (known: {', '.join(list_methods())})")
    return _METHODS[name]


def method_parameters(name: str) -> tuple[str, ...]:
    """The parameter names method ``name`` declares, in their order."""
    return tuple(p.name for p in method_class(name).parameters)


def make_method(name: str, **params: Any) -> MergeMethod:
    """Instantiate method ``name``; parameters it does not declare, and values its
    declarations refuse, are one-line errors."""
    declared = method_parameters(name)
    unknown = sorted(set(params) - set(declared))
    if unknown:
        raise OptionError(
            f"method {name!r} takes no parameter {', '.join(unknown)} "
            f"(its parameters: {describe_names(declared)})"
        )
    try:
        return method_class(name)(**params)
    except (TypeError, ValueError) as e:
        raise OptionError(f"method {name!r}: {e}") from None


def describe_names(names: Sequence[str]) -> str:
    return ", ".join(names) if names else "none"


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
