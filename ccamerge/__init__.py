"""ccamerge: merge neural networks of one architecture with CCA Merge."""

from __future__ import annotations

__version__ = "0.1.0"

from .merge import MergePlan, MergeResult, merge, run_merge  # noqa: E402
from .registry import (  # noqa: E402
    detect_architecture,
    get_architecture,
    list_architectures,
    register_architecture,
)

__all__ = [
    "MergePlan",
    "MergeResult",
    "merge",
    "run_merge",
    "detect_architecture",
    "get_architecture",
    "list_architectures",
    "register_architecture",
]
