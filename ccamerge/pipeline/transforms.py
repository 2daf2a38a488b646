"""Saved transforms: merge again without calibration statistics.

``ccamerge merge --save-transforms T.safetensors`` writes, for every feature
group g and model k, the two d x d float64 matrices of the alignment:

    {g}.M.{k}   model k's units -> shared space (applied on output axes)
    {g}.U.{k}   shared space -> model k's units (applied on input axes)

and, as safetensors metadata (JSON strings), ``format =
"ccamerge-transforms"``, ``format_version``, ``ccamerge_version``, ``method``,
``params``, ``architecture`` (name and config), ``assumptions`` (the settings
checkpoints do not record, e.g. an MLP's activation, as the merge reported them:
``apply`` uses the same), ``groups`` (name -> size),
``n_models``, ``reference``, ``weights`` (those the merge used), ``bn_mode``,
``quality`` (group -> per-model quality), ``inputs`` (file names and
sha256), the calibration settings of the refit or BatchNorm reset
(``calibration_data``, ``num_samples``, ``seed``, ``batch_size``, and
``heldout_split`` when the check or automatic selection kept part of the data out
of it), the refit settings asked for (``refit``: ``enabled``, ``ridge``,
``max_rows``; a file without them was written before the refit existed and
is applied without it), and the distillation's (``distill``: every setting and the
data it trained on; None without ``--distill``).

:func:`run_apply` reads the file, checks that it fits the checkpoints
(architecture and config, group names and sizes, number of models, matrix
shapes), and runs the last steps of the merge (``sum_k w_k M_k W_k U_k``, the
refit or the BatchNorm reset on optional calibration data) with the same code
as ``run_merge``. Weights, BatchNorm mode, the refit and the calibration
settings default to the recorded ones, so the same checkpoints and calibration file give the
same tensors bit for bit.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..io.files import (
    _check_readable,
    _read_safetensors,
    read_metadata,
    save_safetensors_atomic,
    sha256,
)
from ..maths.refit import RefitSettings
from ..methods import Alignment, GroupAlignment
from ..runtime.errors import ArchitectureError, CheckpointError, OptionError, SpecError
from ..version import __version__
from .load import DataSettings, LoadedModels

FORMAT = "ccamerge-transforms"
FORMAT_VERSION = 1


def tensor_name(group: str, kind: str, k: int) -> str:
    """``{group}.{M|U}.{k}``"""
    return f"{group}.{kind}.{k}"


def recorded_settings(
    data: DataSettings,
    heldout_fraction: float | None,
    refit: RefitSettings,
    distill: dict[str, Any] | None,
) -> dict[str, Any]:
    """What a transforms file records of the calibration (``heldout_fraction``: of the
    samples held out of the merge, None: none), the refit and the distillation (its
    report's ``settings`` and data, None without it); ``apply`` reads them."""
    return {
        "data": data.calibration,
        "num_samples": data.num_samples,
        "seed": data.seed,
        "batch_size": data.batch_size,
        "heldout_fraction": heldout_fraction,
        "refit": refit.record(),
        "distill": distill,
    }


def save_transforms(
    path: str | os.PathLike,
    alignment: Alignment,
    loaded: LoadedModels,
    report: dict[str, Any],
    calibration: dict[str, Any],
) -> None:
    """Write every ``M_k`` and ``U_k`` of ``alignment`` (float64) with the merge's provenance;
    ``calibration``: ``data``, ``num_samples``, ``seed``, ``batch_size``, ``heldout_fraction``
    and ``refit`` (``enabled``, ``ridge``, ``max_rows``)."""
    tensors = {}
    for g in loaded.spec.groups:
        ga = alignment.groups[g.name]
        for k in range(len(loaded.state_dicts)):
            tensors[tensor_name(g.name, "M", k)] = ga.M[k].to(torch.float64)
            tensors[tensor_name(g.name, "U", k)] = ga.U[k].to(torch.float64)
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "ccamerge_version": __version__,
        "method": report["method"],
        "params": report["params"],
        "architecture": report["architecture"],
        "assumptions": report.get("assumptions") or [],
        "groups": loaded.spec.sizes,
        "n_models": len(loaded.state_dicts),
        "reference": report["reference"],
        "weights": report["weights"],
        "bn_mode": report["bn_mode"],
        "quality": {g: a.quality for g, a in alignment.groups.items()},
        "inputs": [{"name": Path(i["path"]).name, "sha256": i["sha256"]} for i in report["inputs"]],
        "calibration_data": Path(calibration["data"]).name if calibration["data"] else None,
        "num_samples": calibration["num_samples"],
        "seed": calibration["seed"],
        "batch_size": calibration["batch_size"],
        # the check or automatic selection holds part of the calibration data out
        "heldout_split": {"fraction": calibration["heldout_fraction"], "seed": calibration["seed"]}
        if calibration["heldout_fraction"] is not None
        else None,
        "refit": calibration["refit"],
        "distill": calibration["distill"],
    }
    save_safetensors_atomic(tensors, path, metadata)


@dataclass
class SavedTransforms:
    """A transforms file read back: the alignment and its (JSON-decoded) metadata."""

    path: str
    alignment: Alignment
    metadata: dict[str, Any]

    @property
    def n_models(self) -> int:
        return int(self.metadata["n_models"])

    @property
    def reference(self) -> int:
        return int(self.metadata["reference"])


def load_transforms(path: str | os.PathLike) -> SavedTransforms:
    """Read a transforms file; :class:`CheckpointError` when it is not one or is incomplete."""
    path = Path(path)
    _check_readable(path, "transforms file", CheckpointError)
    tensors = _read_safetensors(path, CheckpointError, "transforms file")
    raw = read_metadata(path)
    if raw.get("format") != FORMAT:
        raise CheckpointError(
            f"transforms file {path} was not written by `ccamerge merge --save-transforms` "
            "(no 'ccamerge-transforms' format tag)"
        )
    meta: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            meta[key] = json.loads(value)
        except json.JSONDecodeError:
            meta[key] = value
    missing = [
        key
        for key in ("groups", "n_models", "reference", "architecture", "method")
        if key not in meta
    ]
    if missing:
        raise CheckpointError(f"transforms file {path}: metadata lacks {', '.join(missing)}")
    n = int(meta["n_models"])
    quality = meta.get("quality") or {}
    groups = {}
    for g, d in meta["groups"].items():
        mats: dict[str, list[torch.Tensor]] = {"M": [], "U": []}
        for kind in ("M", "U"):
            for k in range(n):
                name = tensor_name(g, kind, k)
                t = tensors.get(name)
                if t is None:
                    raise CheckpointError(f"transforms file {path}: tensor {name} is missing")
                if tuple(t.shape) != (d, d):
                    raise CheckpointError(
                        f"transforms file {path}: {name} has shape {tuple(t.shape)}, "
                        f"expected ({d}, {d})"
                    )
                if not torch.isfinite(t).all():
                    raise CheckpointError(f"transforms file {path}: {name} has NaN or Inf values")
                mats[kind].append(t.to(torch.float64))
        groups[g] = GroupAlignment(
            M=mats["M"], U=mats["U"], quality=list(quality.get(g, [None] * n))
        )
    return SavedTransforms(str(path), Alignment(groups), meta)


def check_fits(saved: SavedTransforms, loaded: LoadedModels) -> list[str]:
    """Errors when the transforms do not fit the checkpoints; warnings (returned) when the
    checkpoints are not the files the transforms were computed from."""
    arch = saved.metadata["architecture"]
    name, config = arch.get("name"), arch.get("config")
    here = json.loads(json.dumps(loaded.detected.config))
    if name != loaded.detected.name or config != here:
        raise ArchitectureError(
            f"transforms {saved.path} were computed for a {name} with config {config}, "
            f"but the checkpoints are a {loaded.detected.name} with config {here}"
        )
    if saved.n_models != len(loaded.paths):
        raise OptionError(
            f"transforms {saved.path} hold {saved.n_models} models, "
            f"but {len(loaded.paths)} checkpoints were given"
        )
    sizes = {g: int(d) for g, d in saved.metadata["groups"].items()}
    spec_sizes = loaded.spec.sizes
    if set(sizes) != set(spec_sizes):
        only_file = sorted(set(sizes) - set(spec_sizes))
        only_spec = sorted(set(spec_sizes) - set(sizes))
        raise SpecError(
            f"transforms {saved.path} do not fit the checkpoints' feature groups: "
            f"groups only in the file {only_file}, only in the checkpoints {only_spec}"
        )
    for g, d in spec_sizes.items():
        if sizes[g] != d:
            raise SpecError(
                f"transforms {saved.path}: group {g} has {sizes[g]} units, the checkpoints {d}"
            )
    warnings = []
    recorded = saved.metadata.get("inputs") or []
    for k, (path, info) in enumerate(zip(loaded.paths, recorded)):
        if info.get("sha256") and info["sha256"] != sha256(path):
            warnings.append(
                f"checkpoint {k} ({path}) is not the file the transforms were computed for "
                f"({info.get('name')}); the alignment may not fit it"
            )
    return warnings
