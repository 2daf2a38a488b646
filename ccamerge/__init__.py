"""ccamerge: merge neural networks of one architecture with CCA Merge."""

from __future__ import annotations

from . import archs  # noqa: F401  (registers the built-in architectures)
from .merge import MergePlan, MergeResult, merge, run_merge
from .registry import (
    detect_architecture,
    get_architecture,
    list_architectures,
    register_architecture,
)
from .version import __version__

__all__ = [
    "__version__",
    "MergePlan",
    "MergeResult",
    "merge",
    "run_merge",
    "detect_architecture",
    "get_architecture",
    "list_architectures",
    "register_architecture",
]
