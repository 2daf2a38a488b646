"""Registry of architectures that ccamerge can detect, build and merge.

An entry is a class with a ``name`` and three methods::

    detect(state_dict) -> dict          # its config, or raise NotThisArchitecture
    build(config) -> torch.nn.Module    # a module whose state_dict has the same keys/shapes
    spec(config) -> MergeSpec           # its feature groups

and optionally ``input_shape(config) -> tuple | None`` (the per-sample input
shape, None when any spatial size works). For the generic tests every entry
also gives ``example_config() -> dict`` (a tiny configuration) and, when
``input_shape`` is None, ``example_input_shape(config)``. Register it with
``@register_architecture``; see docs/architectures.md.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from ..runtime.errors import ArchitectureError
from .spec import MergeSpec


class NotThisArchitecture(Exception):
    """Raised by ``detect``: the checkpoint is not this architecture.

    ``score`` in [0, 1] says how close it came (e.g. the share of expected
    tensor names found); the registry names the closest entry in its error.
    """

    def __init__(self, reason: str, score: float = 0.0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.score = score


class Architecture(Protocol):
    name: str
    description: str

    def detect(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]: ...

    def build(self, config: Mapping[str, Any]) -> nn.Module: ...

    def spec(self, config: Mapping[str, Any]) -> MergeSpec: ...


_REGISTRY: dict[str, Architecture] = {}


def register_architecture(cls: type) -> type:
    """Class decorator: instantiate ``cls`` and register it under ``cls.name``."""
    entry = cls()
    if entry.name in _REGISTRY:
        raise ValueError(f"architecture {entry.name!r} is already registered")
    _REGISTRY[entry.name] = entry
    return cls


def unregister_architecture(name: str) -> None:
    _REGISTRY.pop(name, None)


def list_architectures() -> list[str]:
    return sorted(_REGISTRY)


def get_architecture(name: str) -> Architecture:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ArchitectureError(
            f"unknown architecture {name!r}{hint} (known: {', '.join(sorted(_REGISTRY))})"
        )
    return _REGISTRY[name]


@dataclass(frozen=True)
class Detected:
    """An architecture entry with the configuration it read from a checkpoint."""

    arch: Architecture
    config: dict[str, Any]

    @property
    def name(self) -> str:
        return self.arch.name

    def build(self) -> nn.Module:
        return self.arch.build(self.config)

    def spec(self) -> MergeSpec:
        return self.arch.spec(self.config)

    def saved_tensors(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A merged state dict as this model's files hold it: the entry's optional
        ``saved_tensors(config, state)`` (a Hugging Face model's own layout), else as is."""
        fn = getattr(self.arch, "saved_tensors", None)
        return fn(self.config, state) if fn else state

    def input_shape(self) -> tuple[int, ...] | None:
        fn: Callable[[Mapping[str, Any]], tuple[int, ...] | None] | None = getattr(
            self.arch, "input_shape", None
        )
        return fn(self.config) if fn else None


def detect_architecture(
    state_dict: Mapping[str, torch.Tensor], name: str | None = None
) -> Detected:
    """Find the registry entry that fits ``state_dict`` (or check entry ``name``)."""
    if name is not None:
        arch = get_architecture(name)
        try:
            return Detected(arch, arch.detect(state_dict))
        except NotThisArchitecture as e:
            raise ArchitectureError(f"checkpoint is not a {name}: {e.reason}") from None
    misses: list[tuple[float, str, str]] = []
    for arch in _REGISTRY.values():
        try:
            return Detected(arch, arch.detect(state_dict))
        except NotThisArchitecture as e:
            misses.append((e.score, arch.name, e.reason))
    score, best, reason = max(misses) if misses else (0.0, "-", "registry is empty")
    raise ArchitectureError(
        f"no registered architecture fits this checkpoint; closest is {best!r}: {reason}"
    )
