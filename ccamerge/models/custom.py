"""Users' own architectures: ``--model pkg.module:factory`` and spec files.

A *factory* is a callable that returns an ``nn.Module``; ``--model`` names it
as ``pkg.module:factory`` (imported; the current directory is importable) or
``path/to/file.py:factory`` (the file is loaded as a module). It is called
with ``**model_args``. :class:`CustomArchitecture` wraps it as a registry-like
entry (``detect``/``build``/``spec``), so that a
:class:`~ccamerge.models.registry.Detected` and the whole merge pipeline work
unchanged; its feature groups come from :func:`ccamerge.models.discover.discover`.

Spec files (``--spec-out`` writes one, ``--spec`` reads one back) are JSON::

    {"format": "ccamerge-spec", "version": 1,
     "groups": [{"name": "fc1", "size": 48,
                 "members": [["fc1.weight", 0], ["fc1.bias", 0], ["fc2.weight", 1]],
                 "collect_at": "fc2", "collect_on": "input", "norms": []}, ...],
     "untransformed": [...], "warnings": [...]}

A group may add ``"collect_axis": -1`` (its units are the last axis of the collected
tensor: a Linear applied at every position of ``(B, ..., C)``), ``"permutation": true,
"blocks": n`` (its maps are permutations keeping n blocks: a depthwise or grouped conv,
a GroupNorm, a gain reads it), ``"heads": h`` (a group of attention heads: whole heads
permuted, a map per head), ``"follows": group`` (heads in the order of another group's:
an attention layer's query/key space follows its values), ``"whole_heads": true`` (the
units within each head keep their order: rotary position embeddings) and
``"collect_from": i`` (the
group's units start at index i of the collected tensor: a fused projection;
docs/transformers.md), and the document
``"concats": [{"name": ..., "parts": [[group or null, size], ...], "members": [...]}]``
(concatenations of groups that layers read, docs/custom-models.md) and
``"copies": [{"name": ..., "group": ..., "copies": n, "members": [...]}]`` (a group of
heads' units repeated n times per head: grouped-query attention, docs/transformers.md) and
``"folds": [{"norm": ..., "readers": [...]}]`` (norms whose gain and bias the Linear
modules reading them take over, for a group with ``"orthogonal": true``: its maps are
orthogonal and keep the all-ones direction).
``untransformed`` and ``warnings`` are notes for readers; reading ignores them.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..io.files import json_text, write_atomic
from ..runtime.errors import ArchitectureError, OptionError, SpecError
from .attention import make_traceable
from .discover import BATCHNORMS, Discovery, Untransformed, discover, guess_input_shape
from .registry import Detected, NotThisArchitecture
from .spec import Concat, FeatureGroup, HeadCopies, MergeSpec, NormFold

SPEC_FORMAT = "ccamerge-spec"
SPEC_VERSION = 1

# ---------------------------------------------------------------------------
# factories


def load_factory(ref: str) -> Callable[..., Any]:
    """Import the callable that ``ref`` (``pkg.module:name`` or ``file.py:name``) names."""
    where, sep, attr = ref.rpartition(":")
    if not sep or not where or not attr:
        raise OptionError(
            f"--model {ref!r}: expected 'package.module:factory' or 'path/to/file.py:factory'"
        )
    if where.endswith(".py") or os.sep in where or "/" in where:
        module = _load_file(Path(where), ref)
    else:
        if os.getcwd() not in sys.path:  # like `python -m`: the current directory is importable
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as e:
            raise OptionError(f"--model {ref}: cannot import module {where!r} ({e})") from None
        except Exception as e:
            raise OptionError(
                f"--model {ref}: importing {where} failed ({first_line(e)})"
            ) from None
    factory = getattr(module, attr, None)
    if factory is None:
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise OptionError(
            f"--model {ref}: {where} has no attribute {attr!r} "
            f"(callables there: {', '.join(found[:8]) or 'none'})"
        )
    if not callable(factory):
        raise OptionError(f"--model {ref}: {attr} is a {type(factory).__name__}, not callable")
    return factory


def _load_file(path: Path, ref: str) -> Any:
    if not path.is_file():
        raise OptionError(f"--model {ref}: file {path} does not exist")
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    name = f"ccamerge_user_{path.stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise OptionError(f"--model {ref}: {path} cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up by name
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(name, None)
        raise OptionError(f"--model {ref}: importing {path} failed ({first_line(e)})") from None
    return module


def parse_model_args(text: str | None) -> dict[str, Any]:
    """``--model-args``: a JSON object of keyword arguments (empty when not given)."""
    if text is None:
        return {}
    try:
        args = json.loads(text)
    except json.JSONDecodeError as e:
        raise OptionError(f"--model-args is not valid JSON ({e}): {text!r}") from None
    if not isinstance(args, dict):
        raise OptionError(
            f"--model-args must be a JSON object like '{{\"width\": 2}}', got {text!r}"
        )
    return args


def parse_input_shape(text: str | None) -> tuple[int, ...] | None:
    """``--input-shape 3,32,32``: one sample's shape (None when not given)."""
    if text is None:
        return None
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        shape = ()
    if not shape or any(s <= 0 for s in shape):
        raise OptionError(f"--input-shape expects positive integers like 3,32,32, got {text!r}")
    return shape


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def _call(ref: str, model_args: Mapping[str, Any]) -> str:
    args = ", ".join(f"{k}={v!r}" for k, v in model_args.items())
    return f"{ref}({args})"


def build_model(factory: Callable[..., Any], ref: str, model_args: Mapping[str, Any]) -> nn.Module:
    """``factory(**model_args)``, checked to be an ``nn.Module``; its torch.nn attention
    layers get forwards that discovery and the refit can follow (models/attention.py:
    the same parameters and function)."""
    try:
        model = factory(**model_args)
    except Exception as e:
        raise OptionError(f"--model: {_call(ref, model_args)} raised {first_line(e)}") from None
    if not isinstance(model, nn.Module):
        raise OptionError(
            f"--model: {_call(ref, model_args)} returned a {type(model).__name__}, "
            "not a torch.nn.Module"
        )
    make_traceable(model)
    return model


def few_names(names: Sequence[str]) -> str:
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def fit_problems(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Why ``state_dict`` does not load strictly into ``model`` (empty when it does).

    A missing ``num_batches_tracked`` is fine (BatchNorm's loader fills it in)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [
        f"{k} has shape {tuple(state_dict[k].shape)}, the model's is {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing {few_names(missing)}")
    if unexpected:
        problems.append(f"unexpected {few_names(unexpected)}")
    return problems + wrong[:2]


# ---------------------------------------------------------------------------
# the registry-like entry


class CustomArchitecture:
    """A user's factory as an architecture entry; groups from :func:`discover`.

    ``config`` is ``{"factory": ref, "model_args": {...}, "input_shape": [...] or None}``,
    with ``"input_tokens": true`` when the inputs are integer token ids.
    """

    name = "custom"
    description = "a model built by a user's factory (--model); groups discovered by torch.fx"

    def __init__(self, ref: str, model_args: Mapping[str, Any] | None = None) -> None:
        self.ref = ref
        self.model_args = dict(model_args or {})
        self.factory = load_factory(ref)
        self._discoveries: dict[str, Discovery] = {}

    def source(self) -> dict[str, Any]:
        """What builds the model, as its config records it."""
        return {"factory": self.ref, "model_args": self.model_args}

    def config(
        self, input_shape: Sequence[int] | None = None, tokens: bool = False
    ) -> dict[str, Any]:
        shape = [int(s) for s in input_shape] if input_shape is not None else None
        config = {**self.source(), "input_shape": shape}
        return {**config, "input_tokens": True} if tokens else config

    def detect(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        problems = fit_problems(self.build(self.config()), state_dict)
        if problems:
            raise NotThisArchitecture("; ".join(problems))
        return self.config()

    def build(self, config: Mapping[str, Any]) -> nn.Module:
        return build_model(self.factory, config["factory"], config["model_args"])

    def discovery(self, config: Mapping[str, Any]) -> Discovery:
        """Discovered groups of ``config``'s model (computed once per config)."""
        key = json.dumps(config, sort_keys=True, default=str)
        if key not in self._discoveries:
            model, shape = self.build(config), config.get("input_shape")
            self._discoveries[key] = self.discover(model, shape, bool(config.get("input_tokens")))
        return self._discoveries[key]

    def discover(self, model: nn.Module, shape: Sequence[int] | None, tokens: bool) -> Discovery:
        return discover(model, shape, tokens)

    def spec(self, config: Mapping[str, Any]) -> MergeSpec:
        return self.discovery(config).spec

    def input_shape(self, config: Mapping[str, Any]) -> tuple[int, ...] | None:
        shape = config.get("input_shape")
        return tuple(shape) if shape is not None else None


def detect_custom(
    path: str,
    state_dict: Mapping[str, torch.Tensor],
    ref: str,
    model_args: Mapping[str, Any] | None = None,
    input_shape: Sequence[int] | None = None,
    tokens: bool = False,
) -> Detected:
    """The :class:`Detected` for a user's factory; a one-line error when ``path`` does not fit.

    Without ``input_shape`` the config records ``(in_features,)`` when the model's
    input feeds Linear layers, else None (discovery then asks for one); ``tokens``: the
    inputs are integer token ids."""
    arch = CustomArchitecture(ref, model_args)
    try:
        arch.detect(state_dict)
    except NotThisArchitecture as e:
        raise ArchitectureError(
            f"{path} does not fit {_call(ref, arch.model_args)}: {e.reason}"
        ) from None
    if input_shape is None:
        input_shape = guess_input_shape(arch.build(arch.config()))
    return Detected(arch, arch.config(input_shape, tokens))


def resolve_spec(detected: Detected, spec_path: str | None = None) -> tuple[MergeSpec, list[str]]:
    """The spec to merge with, and warnings: a spec file (checked against the model),
    else a custom model's discovered groups, else the registry's spec."""
    if spec_path is not None:
        spec = load_spec(spec_path)
        check_spec(spec, detected.build(), spec_path)
        return spec, []
    if isinstance(detected.arch, CustomArchitecture):
        found = detected.arch.discovery(detected.config)
        return found.spec, list(found.warnings)
    return detected.spec(), []


def untransformed_of(detected: Detected) -> tuple[Untransformed, ...]:
    """What discovery left untransformed and why (nothing for registry entries)."""
    if isinstance(detected.arch, CustomArchitecture):
        return detected.arch.discovery(detected.config).untransformed
    return ()


# ---------------------------------------------------------------------------
# spec files


def spec_to_dict(
    spec: MergeSpec,
    untransformed: Iterable[Untransformed] = (),
    warnings: Iterable[str] = (),
) -> dict[str, Any]:
    """The JSON document of a spec (format in the module docstring)."""
    return {
        "format": SPEC_FORMAT,
        "version": SPEC_VERSION,
        "groups": [
            {
                "name": g.name,
                "size": g.size,
                "members": [[t, a] for t, a in g.members],
                "collect_at": g.collect_at,
                "collect_on": g.collect_on,
                **({"collect_axis": -1} if g.collect_axis == -1 else {}),
                "norms": list(g.norms),
                **({"permutation": True, "blocks": g.blocks} if g.permutation else {}),
                **(_heads_doc(g) if g.heads > 1 else {}),
                **({"orthogonal": True} if g.orthogonal else {}),
            }
            for g in spec.groups
        ],
        **({"concats": [_concat_doc(c) for c in spec.concats]} if spec.concats else {}),
        **({"copies": [copies_doc(c) for c in spec.copies]} if spec.copies else {}),
        **({"folds": [fold_doc(f) for f in spec.folds]} if spec.folds else {}),
        "untransformed": [asdict(u) for u in untransformed],
        "warnings": list(warnings),
    }


def _heads_doc(g: FeatureGroup) -> dict[str, Any]:
    doc: dict[str, Any] = {"heads": g.heads}
    if g.follows is not None:
        doc["follows"] = g.follows
    if g.collect_from is not None:
        doc["collect_from"] = g.collect_from
    if g.whole_heads:
        doc["whole_heads"] = True
    return doc


def _concat_doc(c: Concat) -> dict[str, Any]:
    return {
        "name": c.name,
        "parts": [[g, n] for g, n in c.parts],
        "members": [[t, a] for t, a in c.members],
    }


def copies_doc(c: HeadCopies) -> dict[str, Any]:
    """A head copies entry as spec files (and ``inspect``) write it."""
    return {
        "name": c.name,
        "group": c.group,
        "copies": c.copies,
        "members": [[t, a] for t, a in c.members],
    }


def fold_doc(f: NormFold) -> dict[str, Any]:
    """A fold as spec files (and ``inspect``) write it."""
    return {"norm": f.norm, "readers": list(f.readers)}


def _folds_from(docs: Any, where: str) -> tuple[NormFold, ...]:
    """The ``folds`` of a spec document: a norm and the Linear modules reading it."""
    out = []
    for i, f in enumerate(docs if isinstance(docs, list) else [None]):
        ok = isinstance(f, dict) and set(f) == {"norm", "readers"}
        ok = ok and isinstance(f["norm"], str) and isinstance(f["readers"], list)
        if not (ok and all(isinstance(r, str) for r in f["readers"])):
            raise SpecError(f"{where}: fold {i} must be {{norm, readers: [module names]}}")
        out.append(NormFold(f["norm"], tuple(f["readers"])))
    return tuple(out)


def _is_members(members: Any) -> bool:
    return isinstance(members, list) and all(
        isinstance(m, list) and len(m) == 2 and isinstance(m[0], str) and isinstance(m[1], int)
        for m in members
    )


def _copies_from(docs: Any, where: str) -> tuple[HeadCopies, ...]:
    """The ``copies`` of a spec document: name, group, copies, members."""
    out = []
    for i, c in enumerate(docs if isinstance(docs, list) else [None]):
        ok = isinstance(c, dict) and set(c) == {"name", "group", "copies", "members"}
        ok = ok and isinstance(c["name"], str) and isinstance(c["group"], str)
        if not (ok and isinstance(c["copies"], int) and _is_members(c["members"])):
            raise SpecError(
                f"{where}: head copies {i} must be {{name, group, copies: int, "
                "members: [[tensor, axis]]}"
            )
        members = tuple((t, a) for t, a in c["members"])
        out.append(HeadCopies(c["name"], c["group"], c["copies"], members))
    return tuple(out)


def _concats_from(docs: Any, where: str) -> tuple[Concat, ...]:
    """The ``concats`` of a spec document: name, parts ([group or null, size]), members."""
    out = []
    for i, c in enumerate(docs if isinstance(docs, list) else [None]):
        ok = isinstance(c, dict) and set(c) == {"name", "parts", "members"}
        ok = ok and isinstance(c["name"], str) and isinstance(c["parts"], list)
        ok = ok and all(
            isinstance(p, list) and len(p) == 2 and (p[0] is None or isinstance(p[0], str))
            and isinstance(p[1], int) for p in c["parts"]
        )  # fmt: skip
        if not (ok and _is_members(c["members"])):
            raise SpecError(
                f"{where}: concatenation {i} must be {{name, parts: [[group or null, size]], "
                "members: [[tensor, axis]]}"
            )
        parts = tuple((p[0], p[1]) for p in c["parts"])
        out.append(Concat(c["name"], parts, tuple((t, a) for t, a in c["members"])))
    return tuple(out)


def save_spec(
    path: str | os.PathLike,
    spec: MergeSpec,
    untransformed: Iterable[Untransformed] = (),
    warnings: Iterable[str] = (),
) -> None:
    """Write a spec file (JSON)."""
    text = json_text(spec_to_dict(spec, untransformed, warnings), indent=2) + "\n"
    text = re.sub(r'\[\s+("[^"\n]*"),\s+(\d+)\s+\]', r"[\1, \2]", text)  # a member per line
    write_atomic(path, text.encode())


_GROUP_KEYS = {
    "name", "size", "members", "collect_at", "collect_on", "collect_axis", "norms", "permutation",
    "blocks", "heads", "follows", "collect_from", "whole_heads", "orthogonal",
}  # fmt: skip


def _member_list(group: dict[str, Any], key: str, label: str) -> tuple[tuple[str, int], ...]:
    """A group's ``members``: [tensor, axis] pairs."""
    members = group.get(key)
    if not isinstance(members, list) or not all(
        isinstance(m, list)
        and len(m) == 2
        and isinstance(m[0], str)
        and isinstance(m[1], int)
        and not isinstance(m[1], bool)
        for m in members
    ):
        raise SpecError(f"{label}: '{key}' must be a list of [tensor, axis] pairs")
    return tuple((t, a) for t, a in members)


def spec_from_dict(doc: Any, where: str = "spec") -> MergeSpec:
    """Parse a spec document, with errors that name the group and the field."""
    if not isinstance(doc, dict) or doc.get("format") != SPEC_FORMAT:
        raise SpecError(f'{where}: not a ccamerge spec (expected "format": "{SPEC_FORMAT}")')
    if doc.get("version") != SPEC_VERSION:
        raise SpecError(f"{where}: unsupported spec version {doc.get('version')!r}")
    groups = doc.get("groups")
    if not isinstance(groups, list):
        raise SpecError(f"{where}: 'groups' must be a list")
    out = []
    for i, g in enumerate(groups):
        label = f"{where}: group {i}"
        if not isinstance(g, dict):
            raise SpecError(f"{label} is not an object")
        label += f" ({g.get('name')!r})"
        unknown = sorted(set(g) - _GROUP_KEYS)
        missing = sorted({"name", "size", "members", "collect_at"} - set(g))
        if unknown or missing:
            what = f"unknown key(s) {', '.join(unknown)}" if unknown else ""
            what += ("; " if unknown and missing else "") + (
                f"missing {', '.join(missing)}" if missing else ""
            )
            raise SpecError(f"{label}: {what}")
        members = _member_list(g, "members", label)
        size = g["size"]
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise SpecError(f"{label}: 'size' must be a positive integer")
        on = g.get("collect_on", "output")
        if on not in ("input", "output"):
            raise SpecError(f'{label}: \'collect_on\' must be "input" or "output"')
        axis = g.get("collect_axis", 1)
        if axis not in (1, -1) or isinstance(axis, bool):
            raise SpecError(
                f"{label}: 'collect_axis' must be 1 (units after the batch axis) or -1 (last)"
            )
        norms = g.get("norms", [])
        if not isinstance(norms, list) or not all(isinstance(n, str) for n in norms):
            raise SpecError(f"{label}: 'norms' must be a list of module names")
        if not isinstance(g["name"], str) or not isinstance(g["collect_at"], str):
            raise SpecError(f"{label}: 'name' and 'collect_at' must be strings")
        permutation, blocks = g.get("permutation", False), g.get("blocks", 1)
        if not isinstance(permutation, bool) or not isinstance(blocks, int) or blocks < 1:
            raise SpecError(f"{label}: 'permutation' must be true/false, 'blocks' an integer >= 1")
        heads, follows, start = g.get("heads", 1), g.get("follows"), g.get("collect_from")
        if not isinstance(heads, int) or isinstance(heads, bool) or heads < 1:
            raise SpecError(f"{label}: 'heads' must be an integer >= 1")
        if not isinstance(follows, str | None) or not isinstance(start, int | None):
            raise SpecError(f"{label}: 'follows' must be a group name, 'collect_from' an index")
        whole_heads, orthogonal = g.get("whole_heads", False), g.get("orthogonal", False)
        if not isinstance(whole_heads, bool) or not isinstance(orthogonal, bool):
            raise SpecError(f"{label}: 'whole_heads' and 'orthogonal' must be true/false")
        out.append(
            FeatureGroup(
                name=g["name"],
                size=size,
                members=members,
                collect_at=g["collect_at"],
                collect_on=on,
                collect_axis=axis,
                norms=tuple(norms),
                permutation=permutation,
                blocks=blocks,
                heads=heads,
                follows=follows,
                collect_from=start,
                whole_heads=whole_heads,
                orthogonal=orthogonal,
            )
        )
    try:
        concats = _concats_from(doc.get("concats", []), where)
        copies = _copies_from(doc.get("copies", []), where)
        return MergeSpec(tuple(out), concats, copies, _folds_from(doc.get("folds", []), where))
    except SpecError as e:
        raise SpecError(f"{where}: {e}") from None


def load_spec(path: str | os.PathLike) -> MergeSpec:
    """Read a spec file written by ``--spec-out`` (possibly edited by hand)."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"spec file {p} does not exist")
    try:
        doc = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SpecError(f"spec file {p} is not valid JSON ({first_line(e)})") from None
    return spec_from_dict(doc, f"spec file {p}")


def check_spec(spec: MergeSpec, model: nn.Module, where: str = "spec") -> None:
    """Check a spec against a model: tensor shapes (:meth:`MergeSpec.validate`),
    collection points and norms that name modules of the model."""
    try:
        spec.validate(model.state_dict())
    except SpecError as e:
        raise SpecError(f"{where}: {e}") from None
    modules = dict(model.named_modules())
    for g in spec.groups:
        if g.collect_at not in modules:
            raise SpecError(f"{where}: group {g.name}: collect_at {g.collect_at!r} is not a module")
        for n in g.norms:
            if not isinstance(modules.get(n), BATCHNORMS):
                raise SpecError(f"{where}: group {g.name}: norm {n!r} is not a BatchNorm module")
