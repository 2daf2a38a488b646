"""Merge methods; importing this package registers the built-in ones."""

from . import average, cca, permute, weight_matching, zipit  # noqa: F401
from .base import (
    AlignContext,
    Alignment,
    GroupAlignment,
    MergeMethod,
    list_methods,
    make_method,
    method_parameters,
    register_method,
)

__all__ = [
    "AlignContext",
    "Alignment",
    "GroupAlignment",
    "MergeMethod",
    "list_methods",
    "make_method",
    "method_parameters",
    "register_method",
]
