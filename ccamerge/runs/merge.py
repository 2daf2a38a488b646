"""The merge executor: one readable pass from checkpoints to a merged file.

``run_merge(plan)`` loads and validates the checkpoints, gathers calibration
statistics, aligns every model to the reference with the chosen method,
transforms and averages the tensors, refits the merge layer by layer (default;
with ``refit=False``, or when the network cannot be refitted, it fixes
BatchNorm instead: the paper's CCA Merge), optionally evaluates, and writes the
result atomically. It returns a :class:`MergeResult` whose
``report`` is what the CLI prints (rich on stderr, JSON on stdout).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..io.files import OUTPUT_SUFFIXES, check_outputs, check_stdin_once
from ..maths.bn import has_batchnorm
from ..methods import list_methods, make_method, method_parameters
from ..models.assumptions import check_settings, describe
from ..models.custom import save_spec
from ..pipeline import (
    DEFAULT_MAX_ROWS,
    DEFAULT_RIDGE,
    MIN_HELDOUT,
    MergeResult,
    Progress,
    Timer,
    align_models,
    candidate_methods,
    check_batch_size,
    check_data_fits,
    check_labels,
    check_refit_options,
    choose_best_reference,
    evaluate_all,
    gather_statistics,
    group_report,
    label,
    load_models,
    normalise_weights,
    parse_reference,
    provenance,
    read_calibration,
    read_eval_data,
    refit_or_fix_batchnorm,
    resolve_bn_mode,
    resolve_device,
    sample_warnings,
    save_transforms,
    select,
    split_heldout,
    statistics_mode,
    write_model,
)
from ..runtime.errors import OptionError, remedies
from .remedies import REMEDIES
from .report import MergeReport, describe_architecture, describe_inputs


@dataclass
class MergePlan:
    """Everything ``ccamerge merge`` was asked to do."""

    checkpoints: list[str]
    output: str | None = None
    data: str | None = None
    eval_data: str | None = None
    arch: str | None = None
    model: str | None = (
        None  # a user's factory: pkg.module:fn or file.py:fn (ccamerge.models.custom)
    )
    model_args: dict[str, Any] = field(default_factory=dict)
    activation: str | None = None  # an MLP's activation; None: ReLU, assumed and checked
    spec: str | None = None  # a spec file (JSON) that replaces the detected feature groups
    spec_out: str | None = None  # write the feature groups used to this JSON file
    method: str = "cca"
    method_params: dict[str, Any] = field(default_factory=dict)
    weights: list[float] | None = None
    reference: int | str = 0  # an index, "first" or "best"
    num_samples: int | None = None
    batch_size: int = 256
    seed: int = 0
    device: str = "cpu"
    reset_bn: bool = True
    bn_mode: str = "auto"
    force: bool = False
    select_by: str = "agreement"
    heldout_fraction: float = 0.2
    save_transforms: str | None = None
    stats_mode: str = "auto"  # auto, joint or pairwise (see statistics_mode)
    memory_limit: int | None = None  # bytes for statistics; default half the available RAM
    refit: bool = True  # refit the merge layer by layer (docs/refit.md); False: the paper's merge
    refit_ridge: float = DEFAULT_RIDGE
    refit_max_rows: int = DEFAULT_MAX_ROWS  # rows of one layer's fit at most (0: no limit)


def run_merge(plan: MergePlan, progress: Progress | None = None) -> MergeResult:
    check_stdin_once(named_inputs(plan))
    progress = progress or Progress()
    timer = Timer()
    device = resolve_device(plan.device)
    check_refit_options(plan.refit_ridge, plan.refit_max_rows)
    candidates = candidate_methods(plan.method, plan.method_params, plan.refit)
    method, auto = candidates[0], len(candidates) > 1
    bn_modes = {resolve_bn_mode(plan.bn_mode, m) for m in candidates}
    bn_mode = "renorm" if "renorm" in bn_modes else bn_modes.pop()
    check_batch_size(plan.batch_size)
    inputs = run_inputs(plan)
    output_files = output_options(plan)
    out_path, transforms_path, spec_path = check_outputs(output_files, inputs, plan.force)
    n = len(plan.checkpoints)
    reference = parse_reference(plan.reference, n)
    weights = normalise_weights(plan.weights, n)
    if plan.data is None and (auto or any(m.needs_data for m in candidates)):
        free = " or ".join(m for m in list_methods() if not make_method(m).needs_data)
        raise OptionError(
            f"method {plan.method!r} needs calibration data: pass model-ready inputs with "
            "--data FILE (.npz, .npy, .pt, .safetensors; '-' reads standard input), or merge "
            f"without data with --method {free}"
        )

    with timer.phase("load"):
        calib = read_calibration(plan.data, plan.num_samples, plan.seed)
        shape = tuple(calib.x.shape[1:]) if calib is not None else None
        stated = {"activation": plan.activation}
        with remedies(**REMEDIES["merge"]):
            loaded = load_models(
                plan.checkpoints, plan.arch, plan.model, plan.model_args, plan.spec, shape, stated
            )
        if calib is not None:
            check_data_fits(calib, loaded, "calibration data")
        eval_data = read_eval_data(plan.eval_data, loaded)
        if eval_data is not None:
            with torch.no_grad():  # labels out of range: say so now, not after the merge
                outputs = loaded.build(loaded.state_dicts[0])(eval_data.x[:1]).shape[1]
            check_labels(eval_data, outputs)
        if reference is None:
            reference, reference_choice = choose_best_reference(
                loaded, eval_data, calib, plan.batch_size, device
            )
        else:
            reference_choice = {"rule": "first" if str(plan.reference) == "first" else "index"}

    warnings: list[str] = list(loaded.warnings)
    for data, what in ((calib, "calibration data"), (eval_data, "evaluation data")):
        note = data.scale_warning(what) if data is not None else None
        warnings += [note] if note else []
    labelled = eval_data if eval_data is not None else calib
    warnings += check_settings(loaded, labelled, stated, plan.batch_size, device)
    refit = plan.refit and calib is not None
    if plan.refit and calib is None:
        warnings.append("refit skipped: no calibration data (--data)")
    if refit and not plan.reset_bn:
        warnings.append(
            "--no-reset-bn has no effect with the refit, which writes the BatchNorm statistics "
            "itself (--no-refit keeps the averaged ones)"
        )
    if auto and calib is not None and len(calib) < 2 * MIN_HELDOUT:
        fixed = {
            k: v
            for k, v in plan.method_params.items()
            if v != "auto" and k in method_parameters(method.name)
        }
        method, auto = make_method(method.name, **fixed), False
        warnings.append(
            f"automatic selection needs at least {2 * MIN_HELDOUT} calibration samples "
            f"(got {len(calib)}); merged with {label(method)} instead"
        )
    stats = None
    split = split_heldout(calib, plan.heldout_fraction, plan.seed) if auto and calib else None
    if split is not None:
        calib = split.stats  # the held-out part never feeds statistics or BN reset
    # the plain merges that selection scores fix BatchNorm; a refitted merge does not
    bn_fixed = not refit or split is not None
    if calib is not None and (method.needs_data or (bn_mode == "renorm" and bn_fixed)):
        pairwise, notes = statistics_mode(
            plan.stats_mode, loaded.spec, n, candidates, plan.memory_limit
        )
        warnings += notes
        with timer.phase("statistics"):
            stats = gather_statistics(
                loaded,
                calib,
                plan.batch_size,
                device,
                progress,
                pairwise=pairwise,
                reference=reference,
                # the renormalisation targets' statistics
                norm_stats=bn_mode == "renorm" and plan.reset_bn and bn_fixed,
            )
        warnings += sample_warnings(loaded.spec, stats)

    selection = None
    if split is not None:
        with timer.phase("selection"):
            winner, scored, state, model, bn_done = select(
                loaded,
                stats,
                candidates,
                split,
                weights,
                reference,
                lambda m: resolve_bn_mode(plan.bn_mode, m),
                plan.reset_bn,
                plan.batch_size,
                device,
                plan.select_by,
            )
        method, alignment = winner.method, winner.alignment
        bn_mode = resolve_bn_mode(plan.bn_mode, method)
        selection = {
            "select_by": plan.select_by,
            "heldout_samples": len(split.heldout),
            "candidates": [c.to_dict() for c in scored],
            "winner": label(method),
        }
    else:
        with timer.phase("alignment"):
            alignment = align_models(method, loaded, reference, stats)
    refitted = None
    if split is None or refit:  # else: the selection's winner as it was scored
        state, model, bn_done, refitted = refit_or_fix_batchnorm(
            loaded, alignment, weights, reference, calib, stats, bn_mode, plan.reset_bn,
            plan.batch_size, device, refit, plan.refit_ridge, plan.refit_max_rows, progress,
            timer, warnings,
        )  # fmt: skip
    if calib is None and has_batchnorm(model) and plan.reset_bn:
        warnings.append("no calibration data: BatchNorm running statistics were not reset")

    evaluation = None
    if eval_data is not None:
        with timer.phase("evaluate"):
            evaluation = evaluate_all(loaded, model, eval_data, plan.batch_size, device)

    report = MergeReport(
        architecture=describe_architecture(loaded.detected),
        assumptions=describe(loaded.detected, stated),
        method=method.name,
        params=method.params(),
        inputs=describe_inputs(plan.checkpoints),
        reference=reference,
        reference_choice=reference_choice,
        weights=weights,
        output=str(out_path) if out_path else None,
        num_samples=stats.num_samples if stats else len(calib) if refitted else 0,
        batchnorm=bn_done,
        bn_mode=bn_mode,
        groups=group_report(loaded.spec, alignment, reference),
        warnings=warnings,
        timings=timer.timings,
        selection=selection,
        refit=refitted.section() if refitted else None,
        evaluation=evaluation,
    ).to_dict()

    with timer.phase("write"):
        check_outputs(output_files, inputs, plan.force)  # again: minutes passed
        if out_path is not None:
            metadata = provenance(report, plan.data, plan.seed)
            write_model(state, plan.output, inputs, plan.force, metadata)
        if transforms_path is not None:
            save_transforms(transforms_path, alignment, loaded, report, calibration_of(plan))
        if spec_path is not None:  # last, so that a failed merge writes nothing
            save_spec(spec_path, loaded.spec, warnings=loaded.warnings)
    return MergeResult(state, model, alignment, report)


def calibration_of(plan: MergePlan) -> dict[str, Any]:
    """The calibration and refit settings a transforms file records."""
    keys = ("data", "num_samples", "seed", "batch_size", "heldout_fraction")
    out = {k: getattr(plan, k) for k in keys}
    out["refit"] = {
        "enabled": plan.refit,
        "ridge": plan.refit_ridge,
        "max_rows": plan.refit_max_rows,
    }
    return out


def named_inputs(plan: MergePlan) -> list[tuple[str, str | None]]:
    """Every input of the merge, ``(what, path or None)``."""
    checkpoints = [(f"checkpoint {k}", c) for k, c in enumerate(plan.checkpoints)]
    return [
        *checkpoints,
        ("--data", plan.data),
        ("--eval-data", plan.eval_data),
        ("--spec", plan.spec),
    ]


def run_inputs(plan: MergePlan) -> list[str]:
    """Every file the merge reads: no output may land on one of them."""
    return [p for _, p in named_inputs(plan) if p is not None]


def output_options(plan: MergePlan) -> list[tuple[str, str | None, tuple[str, ...] | None]]:
    """Every file the merge writes: (option, path or None, suffixes) for :func:`check_outputs`."""
    return [
        ("output", plan.output, OUTPUT_SUFFIXES),
        ("--save-transforms", plan.save_transforms, (".safetensors",)),
        ("--spec-out", plan.spec_out, None),
    ]


def merge(checkpoints: Sequence[str], **options: Any) -> MergeResult:
    """Python entry point: ``merge(["a.pt", "b.pt"], data="calib.npz", output="m.safetensors")``.

    Keyword options are the fields of :class:`MergePlan`."""
    names = {f.name for f in dataclasses.fields(MergePlan)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise OptionError(f"unknown option(s) {', '.join(unknown)}")
    return run_merge(MergePlan(checkpoints=[str(c) for c in checkpoints], **options))
