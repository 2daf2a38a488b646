"""ccamerge: merge neural networks of one architecture with CCA Merge.

The names below load on first use (PEP 562): ``import ccamerge`` itself imports
neither torch nor the merge code, so that the command line starts at once.
Importing :mod:`ccamerge.models` registers the built-in architectures and
:mod:`ccamerge.methods` the built-in methods, so ``ccamerge.list_architectures()``
and ``ccamerge.list_methods()`` list them whichever name is used first.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .version import __version__

# each exported name -> the module that defines it
_EXPORTS = {
    "MergePlan": ".runs.merge",
    "MergeResult": ".runs.merge",
    "merge": ".runs.merge",
    "run_merge": ".runs.merge",
    "detect_architecture": ".models.registry",
    "get_architecture": ".models.registry",
    "list_architectures": ".models.registry",
    "register_architecture": ".models.registry",
    "MergeMethod": ".methods",
    "Param": ".methods",
    "list_methods": ".methods",
    "register_method": ".methods",
}

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

if TYPE_CHECKING:  # what the names are, for type checkers and editors
    from .methods import MergeMethod, Param, list_methods, register_method
    from .models.registry import (
        detect_architecture,
        get_architecture,
        list_architectures,
        register_architecture,
    )
    from .runs.merge import MergePlan, MergeResult, merge, run_merge


def __getattr__(name: str) -> Any:
    """An exported name, imported from its module the first time it is asked for."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value  # later look-ups find it without this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
