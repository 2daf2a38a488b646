"""``ccamerge apply``: merge checkpoints again with saved transforms, no alignment
statistics needed (the file format: :mod:`ccamerge.pipeline.transforms`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..io.files import OUTPUT_SUFFIXES, check_output_path, check_stdin_once, sha256
from ..models.assumptions import check_settings, describe, recorded_settings
from ..pipeline import (
    BN_MODES,
    DEFAULT_MAX_ROWS,
    DEFAULT_RIDGE,
    MergeResult,
    Progress,
    Timer,
    check_batch_size,
    check_data_fits,
    check_fits,
    check_refit_options,
    evaluate_all,
    group_report,
    load_models,
    load_transforms,
    normalise_weights,
    provenance,
    read_calibration,
    read_eval_data,
    refit_or_fix_batchnorm,
    resolve_device,
    split_heldout,
    write_model,
)
from ..runtime.errors import ArchitectureError, OptionError
from .report import MergeReport, describe_architecture, describe_inputs


@dataclass
class ApplyPlan:
    """Everything ``ccamerge apply`` was asked to do. ``weights``, ``bn_mode``,
    ``num_samples``, ``seed``, ``batch_size`` and the refit settings (``refit``,
    ``refit_ridge``, ``refit_max_rows``) default to those recorded in the transforms
    file (a file without refit settings: no refit)."""

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
    refit: bool | None = None
    refit_ridge: float | None = None
    refit_max_rows: int | None = None


def run_apply(plan: ApplyPlan, progress: Progress | None = None) -> MergeResult:
    """Merge ``plan.checkpoints`` with saved transforms (no alignment statistics)."""
    checkpoints = [(f"checkpoint {k}", c) for k, c in enumerate(plan.checkpoints)]
    check_stdin_once(
        [("--transforms", plan.transforms), *checkpoints, ("--data", plan.data)]
        + [("--eval-data", plan.eval_data)]
    )
    progress = progress or Progress()
    timer = Timer()
    device = resolve_device(plan.device)
    inputs = [p for p in (plan.transforms, *plan.checkpoints, plan.data, plan.eval_data) if p]
    out_path = None
    if plan.output:
        out_path = check_output_path(plan.output, inputs, plan.force, suffixes=OUTPUT_SUFFIXES)
    with timer.phase("load"):
        saved = load_transforms(plan.transforms)
        arch = saved.metadata["architecture"].get("name")
        settings, assumed = recorded_settings(saved.metadata)
        try:
            loaded = load_models(plan.checkpoints, arch, stated=settings)
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
        batch_size = check_batch_size(int(plan.batch_size or 0))
        calib = read_calibration(plan.data, plan.num_samples, plan.seed)
        if calib is not None:
            check_data_fits(calib, loaded, "calibration data")
            split = meta.get("heldout_split")
            if split:
                calib = split_heldout(calib, split["fraction"], split["seed"]).stats
        eval_data = read_eval_data(plan.eval_data, loaded)
    n, reference = len(loaded.paths), saved.reference
    weights = normalise_weights(plan.weights or meta.get("weights"), n)
    bn_mode = plan.bn_mode if plan.bn_mode not in (None, "auto") else meta.get("bn_mode")
    if bn_mode not in BN_MODES or bn_mode == "auto":
        raise OptionError(f"--bn-mode must be vector or renorm, not {bn_mode!r}")
    labelled = eval_data if eval_data is not None else calib
    checked = {name: None if name in assumed else value for name, value in settings.items()}
    warnings += check_settings(
        loaded, labelled, checked, batch_size, device, remedy="merge again with --{name} {choice}"
    )
    refit, ridge, max_rows = refit_settings(plan, meta.get("refit") or {"enabled": False})
    state, model, bn_done, refitted = refit_or_fix_batchnorm(
        loaded, saved.alignment, weights, reference, calib, None, bn_mode, plan.reset_bn,
        batch_size, device, refit, ridge, max_rows, progress, timer, warnings,
    )  # fmt: skip
    has_norms = any(g.norms for g in loaded.spec.groups)
    if refitted is None and calib is None and plan.reset_bn and (has_norms or bn_mode == "renorm"):
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

    report = MergeReport(
        architecture=describe_architecture(loaded.detected),
        assumptions=describe(
            loaded.detected,
            settings,
            {
                name: f"recorded in transforms {plan.transforms}"
                + (" (assumed at merge)" if name in assumed else "")
                for name in settings
            },
        ),
        method=saved.metadata["method"],
        params=saved.metadata.get("params") or {},
        transforms={"path": plan.transforms, "sha256": sha256(plan.transforms)},
        inputs=describe_inputs(plan.checkpoints),
        reference=reference,
        weights=weights,
        output=str(out_path) if out_path else None,
        num_samples=len(calib) if calib is not None else 0,
        batchnorm=bn_done,
        bn_mode=bn_mode,
        groups=group_report(loaded.spec, saved.alignment, reference),
        warnings=warnings,
        timings=timer.timings,
        refit=refitted.section() if refitted else None,
        evaluation=evaluation,
    ).to_dict()
    if out_path is not None:
        with timer.phase("write"):
            metadata = provenance(report, plan.data, int(plan.seed or 0))
            metadata["transforms"] = {
                "name": Path(plan.transforms).name,
                "sha256": report["transforms"]["sha256"],
            }
            write_model(state, plan.output, inputs, plan.force, metadata)
    return MergeResult(state, model, saved.alignment, report)


def refit_settings(plan: ApplyPlan, recorded: dict[str, Any]) -> tuple[bool, float, int]:
    """``(refit, ridge, max_rows)``: the plan's where given, else the recorded ones."""
    refit = plan.refit if plan.refit is not None else bool(recorded.get("enabled"))
    ridge = plan.refit_ridge if plan.refit_ridge is not None else recorded.get("ridge")
    max_rows = plan.refit_max_rows if plan.refit_max_rows is not None else recorded.get("max_rows")
    ridge = DEFAULT_RIDGE if ridge is None else ridge
    max_rows = DEFAULT_MAX_ROWS if max_rows is None else max_rows
    check_refit_options(ridge, max_rows)
    return refit, ridge, max_rows
