"""Plans from flat options: the CLI's flags and the library's keywords name each setting
once (``refit_ridge``, ``bn_mode``, ``batch_size``); a plan holds them in its settings
objects (``plan.refit.ridge``, ``plan.batchnorm.mode``, ``plan.data.batch_size``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar, TypeVar

from ..runtime.errors import OptionError

Plan = TypeVar("Plan")

# flat option -> (settings field of the plan, field of that object), per settings object
SOURCE_OPTIONS = {
    "arch": ("source", "arch"),
    "model": ("source", "model"),
    "model_args": ("source", "model_args"),
    "spec": ("source", "spec"),
    "activation": ("source", "activation"),
}
DATA_OPTIONS = {
    "data": ("data", "calibration"),
    "eval_data": ("data", "evaluation"),
    "distill_data": ("data", "distillation"),
    "num_samples": ("data", "num_samples"),
    "seed": ("data", "seed"),
    "batch_size": ("data", "batch_size"),
    "device": ("data", "device"),
}
BATCHNORM_OPTIONS = {"bn_mode": ("batchnorm", "mode"), "reset_bn": ("batchnorm", "reset")}


class FromOptions:
    """A plan built from flat options through its ``OPTIONS`` table."""

    OPTIONS: ClassVar[dict[str, tuple[str, str]]] = {}

    @classmethod
    def from_options(cls: type[Plan], checkpoints: Sequence[Any], **options: Any) -> Plan:
        return plan_from_options(cls, checkpoints=[str(c) for c in checkpoints], **options)


def plan_from_options(cls: type[Plan], **options: Any) -> Plan:
    """``cls`` built from flat ``options``: a key of ``cls.OPTIONS`` (flat name ->
    ``(settings field, its field)``) goes to that settings object, any other key must be a
    plain field of ``cls``. Unknown keys are an :class:`OptionError`."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    table: dict[str, tuple[str, str]] = cls.OPTIONS  # type: ignore[attr-defined]
    parts = {part for part, _ in table.values()}
    grouped: dict[str, dict[str, Any]] = {part: {} for part in parts}
    plain: dict[str, Any] = {}
    unknown = []
    for key, value in options.items():
        if key in table:
            part, name = table[key]
            grouped[part][name] = value
        elif key in fields and key not in parts:
            plain[key] = value
        else:
            unknown.append(key)
    if unknown:
        raise OptionError(f"unknown option(s) {', '.join(sorted(unknown))}")
    settings = {part: fields[part].default_factory(**kw) for part, kw in grouped.items()}  # type: ignore[misc]
    return cls(**plain, **settings)
