"""Saved transforms: merge again without calibration statistics.

``ccamerge merge --save-transforms T.safetensors`` writes, for every feature
group g and model k, the two d x d float64 matrices of the alignment:

    {g}.M.{k}   model k's units -> shared space (applied on output axes)
    {g}.U.{k}   shared space -> model k's units (applied on input axes)

and, as safetensors metadata (JSON strings), ``format =
"ccamerge-transforms"``, ``format_version``, ``ccamerge_version``, ``method``,
``params``, ``architecture`` (name and config), ``groups`` (name -> size),
``n_models``, ``reference``, ``weights`` (those the merge used), ``bn_mode``,
``quality`` (group -> per-model quality), ``inputs`` (file names and
sha256), and the calibration settings of the BatchNorm reset
(``calibration_data``, ``num_samples``, ``seed``, ``batch_size``, and
``heldout_split`` when automatic selection kept part of the data out of it).

:func:`run_apply` reads the file, checks that it fits the checkpoints
(architecture and config, group names and sizes, number of models, matrix
shapes), and runs the last steps of the merge (``sum_k w_k M_k W_k U_k``,
BatchNorm reset on optional calibration data) with the same code as
``run_merge``. Weights, BatchNorm mode and the calibration settings default
to the recorded ones, so the same checkpoints and calibration file give the
same tensors bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .errors import ArchitectureError, CheckpointError, OptionError, SpecError
from .io import (
    _check_readable,
    _read_safetensors,
    check_output_path,
    load_data,
    read_metadata,
    save_safetensors_atomic,
    sha256,
)
from .merge import (
    BN_MODES,
    LoadedModels,
    MergePlan,
    MergeResult,
    Progress,
    Timer,
    build_merged,
    check_data_fits,
    evaluate_all,
    gather_statistics,
    group_report,
    load_models,
    normalise_weights,
    provenance,
    resolve_device,
)
from .methods import Alignment, GroupAlignment

FORMAT = "ccamerge-transforms"
FORMAT_VERSION = 1


def tensor_name(group: str, kind: str, k: int) -> str:
    """``{group}.{M|U}.{k}``"""
    return f"{group}.{kind}.{k}"


def save_transforms(
    path: str | os.PathLike,
    alignment: Alignment,
    loaded: LoadedModels,
    report: dict[str, Any],
    plan: MergePlan,
) -> None:
    """Write every ``M_k`` and ``U_k`` of ``alignment`` (float64) with the merge's provenance."""
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
        "groups": loaded.spec.sizes,
        "n_models": len(loaded.state_dicts),
        "reference": report["reference"],
        "weights": report["weights"],
        "bn_mode": report["bn_mode"],
        "quality": {g: a.quality for g, a in alignment.groups.items()},
        "inputs": [{"name": Path(i["path"]).name, "sha256": i["sha256"]} for i in report["inputs"]],
        "calibration_data": Path(plan.data).name if plan.data else None,
        "num_samples": plan.num_samples,
        "seed": plan.seed,
        "batch_size": plan.batch_size,
        # automatic selection holds part of the calibration data out of the BN reset
        "heldout_split": {"fraction": plan.heldout_fraction, "seed": plan.seed}
        if "selection" in report
        else None,
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


@dataclass
class ApplyPlan:
    """Everything ``ccamerge apply`` was asked to do. ``weights``, ``bn_mode``,
    ``num_samples``, ``seed`` and ``batch_size`` default to those recorded in the
    transforms file."""

    transforms: str
    checkpoints: list[str]
    output: str | None = None
    weights: list[float] | None = None
    data: str | None = None
    eval_data: str | None = None
    num_samples: int | None = None
    seed: int | None = None
    batch_size: int | None = None
    device: str = "cpu"
    reset_bn: bool = True
    bn_mode: str | None = None
    force: bool = False


def run_apply(plan: ApplyPlan, progress: Progress | None = None) -> MergeResult:
    """Merge ``plan.checkpoints`` with saved transforms (no alignment statistics)."""
    progress = progress or Progress()
    timer = Timer()
    device = resolve_device(plan.device)
    inputs = [plan.transforms, *plan.checkpoints]
    out_path = check_output_path(plan.output, inputs, plan.force) if plan.output else None
    with timer.phase("load"):
        saved = load_transforms(plan.transforms)
        arch = saved.metadata["architecture"].get("name")
        try:
            loaded = load_models(plan.checkpoints, arch)
        except ArchitectureError as e:
            raise ArchitectureError(
                f"transforms {plan.transforms} were computed for a {arch}, "
                f"but the checkpoints do not fit it: {e}"
            ) from None
        warnings = check_fits(saved, loaded)
        meta = saved.metadata
        plan = dataclasses.replace(
            plan,
            num_samples=plan.num_samples
            if plan.num_samples is not None
            else meta.get("num_samples"),
            seed=plan.seed if plan.seed is not None else int(meta.get("seed") or 0),
            batch_size=plan.batch_size or int(meta.get("batch_size") or 256),
        )
        batch_size = int(plan.batch_size or 0)
        if batch_size <= 0:
            raise OptionError(f"--batch-size must be positive, got {batch_size}")
        calib = None
        if plan.data is not None:
            calib = load_data(plan.data).subset(
                plan.num_samples, plan.seed if plan.num_samples else None
            )
            check_data_fits(calib, loaded, "calibration data")
            split = meta.get("heldout_split")
            if split:
                from .select import split_heldout

                calib = split_heldout(calib, split["fraction"], split["seed"]).stats
        eval_data = None
        if plan.eval_data is not None:
            eval_data = load_data(plan.eval_data, require_labels=True)
            check_data_fits(eval_data, loaded, "evaluation data")
    n, reference = len(loaded.paths), saved.reference
    weights = normalise_weights(plan.weights or meta.get("weights"), n)
    bn_mode = plan.bn_mode if plan.bn_mode not in (None, "auto") else meta.get("bn_mode")
    if bn_mode not in BN_MODES or bn_mode == "auto":
        raise OptionError(f"--bn-mode must be vector or renorm, not {bn_mode!r}")

    stats = None
    has_norms = any(g.norms for g in loaded.spec.groups)
    if calib is not None and plan.reset_bn and bn_mode == "renorm" and has_norms:
        with timer.phase("statistics"):
            stats = gather_statistics(
                loaded, calib, batch_size, device, progress, group_stats=False
            )
    with timer.phase("apply"):
        state, model, bn_done = build_merged(
            loaded,
            saved.alignment,
            weights,
            reference,
            calib,
            stats,
            bn_mode,
            plan.reset_bn,
            batch_size,
            device,
        )
    if calib is None and plan.reset_bn and (has_norms or bn_mode == "renorm"):
        undone = (
            "BatchNorm running statistics were not reset"
            if has_norms
            else "the REPAIR renormalisation of the merged layers was not redone"
        )
        warnings.append(f"no calibration data (--data): {undone}")
    evaluation = None
    if eval_data is not None:
        with timer.phase("evaluate"):
            evaluation = evaluate_all(loaded, model, eval_data, batch_size, device)

    report: dict[str, Any] = {
        "ccamerge_version": __version__,
        "architecture": {"name": loaded.detected.name, "config": loaded.detected.config},
        "method": saved.metadata["method"],
        "params": saved.metadata.get("params") or {},
        "transforms": {"path": plan.transforms, "sha256": sha256(plan.transforms)},
        "inputs": [{"path": p, "sha256": sha256(p)} for p in plan.checkpoints],
        "reference": reference,
        "weights": weights,
        "output": str(out_path) if out_path else None,
        "num_samples": stats.num_samples if stats else 0,
        "batchnorm": bn_done,
        "bn_mode": bn_mode,
        "groups": group_report(loaded.spec, saved.alignment, reference),
        "warnings": warnings,
        "timings": timer.timings,
    }
    if evaluation is not None:
        report["evaluation"] = evaluation
    if out_path is not None:
        with timer.phase("write"):
            check_output_path(out_path, inputs, plan.force)
            meta = provenance(report, plan)  # type: ignore[arg-type]  (reads data and seed)
            meta["transforms"] = {
                "name": Path(plan.transforms).name,
                "sha256": report["transforms"]["sha256"],
            }
            save_safetensors_atomic(state, out_path, meta)
    return MergeResult(state, model, saved.alignment, report)
