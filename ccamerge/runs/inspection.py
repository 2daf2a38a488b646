"""What the registry sees in a checkpoint: architecture, size and feature groups.

``inspect_checkpoint`` loads one checkpoint exactly as ``merge`` does
(:func:`ccamerge.pipeline.load_models`: detection, spec validation, a strict
load into the built module) and describes it as a plain dictionary that the
CLI prints as tables or JSON.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from ..io.files import check_output_path
from ..models.assumptions import describe
from ..models.custom import copies_doc, fold_doc, save_spec, untransformed_of
from ..models.spec import FeatureGroup
from ..pipeline import ModelSource, load_models
from ..runtime.errors import remedies
from .remedies import REMEDIES


def inspect_checkpoint(
    path: str,
    source: ModelSource | None = None,
    input_shape: tuple[int, ...] | None = None,
    spec_out: str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Describe ``path``.

    Fields: ``path``; ``architecture`` ``{name, config}``; ``assumptions``: the settings
    the checkpoint does not record (an MLP's activation: ``activation`` when given, else
    assumed), :func:`ccamerge.models.assumptions.describe`; ``input_shape``
    (per sample, or None when the entry does not say); ``num_parameters``
    (elements of the built module's parameters) and ``num_buffer_values``
    (its buffers, e.g. BatchNorm running statistics); ``num_tensors``;
    ``groups``: one ``{name, size, collect_at, collect_on, collect_axis, norms, maps,
    members}`` per feature group (``maps``: dense, permutation, or per head), ``members``
    being ``{tensor, axis, role, shape}`` with role ``output`` (axis 0, transformed by
    M) or ``input`` (a later axis, by U);
    ``ungrouped``: tensors with no grouped axis (only averaged in a merge).
    With ``source.model`` (``--model``, see :mod:`ccamerge.models.custom`) the groups are discovered
    on samples of ``input_shape``; ``untransformed`` and ``warnings`` say what
    discovery left alone and why. ``spec_out`` writes the groups as a spec file (an
    existing one only with ``force``).
    """
    if spec_out is not None:
        check_output_path(spec_out, [path], force, "--spec-out", suffixes=None)
    source = source or ModelSource()
    stated = source.stated
    with remedies(**REMEDIES["inspect"]):
        loaded = load_models([path], source, input_shape)
    untransformed = untransformed_of(loaded.detected)
    if spec_out is not None:
        check_output_path(spec_out, [path], force, "--spec-out", suffixes=None)
        save_spec(spec_out, loaded.spec, untransformed, loaded.warnings)
    sd = loaded.state_dicts[0]
    model = loaded.build(sd)
    groups = [
        {
            "name": g.name,
            "size": g.size,
            "collect_at": g.collect_at,
            "collect_on": g.collect_on,
            "collect_axis": g.collect_axis,
            "norms": list(g.norms),
            "maps": _maps(g),
            "members": [
                {
                    "tensor": tensor,
                    "axis": axis,
                    "role": "output" if axis == 0 else "input",
                    "shape": list(sd[tensor].shape),
                }
                for tensor, axis in g.members
            ],
        }
        for g in loaded.spec.groups
    ]
    input_shape = loaded.detected.input_shape()
    return {
        "path": path,
        "architecture": {"name": loaded.detected.name, "config": loaded.detected.config},
        "assumptions": describe(loaded.detected, stated),
        "input_shape": list(input_shape) if input_shape is not None else None,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "num_buffer_values": sum(b.numel() for b in model.buffers()),
        "num_tensors": len(sd),
        "groups": groups,
        "copies": [copies_doc(c) for c in loaded.spec.copies],
        "folds": [fold_doc(f) for f in loaded.spec.folds],
        "ungrouped": [name for name in sd if name not in loaded.spec.axes],
        "untransformed": [asdict(u) for u in untransformed],
        "warnings": loaded.warnings,
    }


def _maps(g: FeatureGroup) -> str:
    """What maps the group takes: dense, permutations (within blocks), or per head."""
    if g.follows is not None:
        within = "whole heads" if g.whole_heads else "orthogonal per head"
        return f"{g.heads} heads in the order of {g.follows}, {within}"
    if g.heads > 1:
        if g.whole_heads:
            return f"{g.heads} heads, whole heads"
        return f"{g.heads} heads, " + ("permuted" if g.permutation else "dense per head")
    if g.permutation:
        return "permutation" + (f" within {g.blocks} blocks" if g.blocks > 1 else "")
    if g.orthogonal:
        return "orthogonal, all-ones direction kept (norms folded)"
    return "dense"
