"""Merge methods; importing this package registers the built-in ones.

A new method is one module here (a :class:`MergeMethod` subclass declaring its
:class:`Param` s, decorated with :func:`register_method`) plus its import below;
see docs/methods.md."""

from . import average, cca, permute, weight_matching, zipit  # noqa: F401
from .base import (
    AlignContext,
    Alignment,
    GroupAlignment,
    MergeMethod,
    Param,
    list_methods,
    make_method,
    method_class,
    method_parameters,
    register_method,
    unregister_method,
)

__all__ = [
    "AlignContext",
    "Alignment",
    "GroupAlignment",
    "MergeMethod",
    "Param",
    "list_methods",
    "make_method",
    "method_class",
    "method_parameters",
    "register_method",
    "unregister_method",
]
