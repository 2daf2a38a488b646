"""ccamerge: merge neural networks of one architecture with CCA Merge."""

from __future__ import annotations

from .runtime.interrupts import quiet_interrupt_on_command_line
from .version import __version__

with quiet_interrupt_on_command_line():  # Ctrl-C while torch loads: one line, not a traceback
    from .methods import MergeMethod, Param, list_methods, register_method
    from .models import archs  # noqa: F401  (registers the built-in architectures)
    from .models.registry import (
        detect_architecture,
        get_architecture,
        list_architectures,
        register_architecture,
    )
    from .runs.merge import MergePlan, MergeResult, merge, run_merge

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
    "MergeMethod",
    "Param",
    "list_methods",
    "register_method",
]
