"""``ccamerge apply``: merge checkpoints again with saved transforms, no alignment
statistics needed (the file format: :mod:`ccamerge.pipeline.transforms`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..io.files import OUTPUT_SUFFIXES, DataStream, check_output_path, check_stdin_once, sha256
from ..maths.distill import DistillSettings
from ..models.assumptions import check_settings, describe, recorded_settings
from ..pipeline import (
    BN_MODES,
    BatchNormSettings,
    Calibration,
    DataSettings,
    DistillJob,
    MergeRecipe,
    MergeResult,
    ModelSource,
    Progress,
    RefitSettings,
    RunContext,
    aligned_parameters,
    aligned_warning,
    check_batch_size,
    check_data_fits,
    check_fits,
    evaluate_all,
    group_report,
    load_models,
    load_transforms,
    normalise_weights,
    provenance,
    read_eval_data,
    refit_or_fix_batchnorm,
    resolve_device,
    split_heldout,
    write_model,
)
from ..runtime.errors import ArchitectureError, OptionError
from .merge import distill_and_check, open_distill_data
from .report import MergeReport, describe_architecture, describe_inputs


@dataclass
class ApplyPlan:
    """Everything ``ccamerge apply`` was asked to do. ``weights``, ``bn_mode``,
    ``num_samples``, ``seed``, ``batch_size`` and the refit settings (``refit``,
    ``refit_ridge``, ``refit_max_rows``) default to those recorded in the transforms
    file (a file without refit settings: no refit); the held-out split of the check or
    of selection and a distillation are repeated as recorded (with ``data``)."""

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
    distill_data: str | None = None  # the data a distilled merge trained on, if not calibration


def run_apply(plan: ApplyPlan, progress: Progress | None = None) -> MergeResult:
    """Merge ``plan.checkpoints`` with saved transforms (no alignment statistics)."""
    checkpoints = [(f"checkpoint {k}", c) for k, c in enumerate(plan.checkpoints)]
    check_stdin_once(
        [("--transforms", plan.transforms), *checkpoints, ("--data", plan.data)]
        + [("--eval-data", plan.eval_data), ("--distill-data", plan.distill_data)]
    )
    ctx = RunContext(progress or Progress())
    device = resolve_device(plan.device)
    named = (plan.transforms, *plan.checkpoints, plan.data, plan.eval_data, plan.distill_data)
    inputs = [p for p in named if p]
    out_path = None
    if plan.output:
        out_path = check_output_path(plan.output, inputs, plan.force, suffixes=OUTPUT_SUFFIXES)
    with ctx.timer.phase("load"):
        saved = load_transforms(plan.transforms)
        meta = saved.metadata
        arch = meta["architecture"].get("name")
        settings, assumed = recorded_settings(meta)
        source = ModelSource(arch=arch, activation=settings.get("activation"))
        try:
            recorded = meta["architecture"].get("config") or {}  # a discovered model's input
            shape, tokens = recorded.get("input_shape"), bool(recorded.get("input_tokens"))
            loaded = load_models(plan.checkpoints, source, shape, tokens)
        except ArchitectureError as e:
            raise ArchitectureError(
                f"transforms {plan.transforms} were computed for a {arch}, "
                f"but the checkpoints do not fit it: {e}"
            ) from None
        ctx.warn(*check_fits(saved, loaded))
        data = data_settings(plan, meta, device)
        calib, heldout = data.read_calibration(), None
        if calib is not None:
            check_data_fits(calib.data, loaded, "calibration data")
            split = meta.get("heldout_split")
            if split:
                held = split_heldout(calib, split["fraction"], split["seed"])
                calib, heldout = held.stats, held.heldout
        eval_data = read_eval_data(plan.eval_data, loaded)
        stream = open_distill_data(plan.distill_data, loaded)
    n, reference = len(loaded.paths), saved.reference
    weights = normalise_weights(plan.weights or meta.get("weights"), n)
    bn_mode = plan.bn_mode if plan.bn_mode not in (None, "auto") else meta.get("bn_mode")
    if bn_mode not in BN_MODES or bn_mode == "auto":
        raise OptionError(f"--bn-mode must be vector or renorm, not {bn_mode!r}")
    batchnorm = BatchNormSettings(bn_mode, plan.reset_bn)
    labelled = eval_data if eval_data is not None else calib.data if calib else None
    checked = {name: None if name in assumed else value for name, value in settings.items()}
    ctx.warn(
        *check_settings(
            loaded, labelled, checked, data.batch_size, device,
            remedy="merge again with --{name} {choice}",
        )
    )  # fmt: skip
    refit = refit_settings(plan, meta.get("refit") or {"enabled": False})
    recipe = MergeRecipe(weights, reference, batchnorm, device, saved.alignment)
    state, model, bn_done, refitted = refit_or_fix_batchnorm(
        loaded, recipe, calib, None, refit, ctx
    )
    has_norms = any(g.norms for g in loaded.spec.groups)
    if refitted is None and calib is None and plan.reset_bn and (has_norms or bn_mode == "renorm"):
        undone = (
            "BatchNorm running statistics were not reset"
            if has_norms
            else "the REPAIR renormalisation of the merged layers was not redone"
        )
        ctx.warn(f"no calibration data (--data): {undone}")
    job = recorded_distillation(ctx, meta.get("distill"), calib, heldout, stream)
    distilled, check, trained = distill_and_check(ctx, loaded, recipe, model, heldout, job)
    state = trained or state
    evaluation = None
    if eval_data is not None:
        with ctx.timer.phase("evaluate"):
            evaluation = evaluate_all(loaded, model, eval_data, data.batch_size, device)
    aligned = aligned_parameters(loaded.spec, model, saved.alignment, loaded.unaligned_layers)
    if meta["method"] != "average":
        ctx.warn(aligned_warning(aligned) or "")

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
        method=meta["method"],
        params=meta.get("params") or {},
        aligned=aligned,
        transforms={"path": plan.transforms, "sha256": sha256(plan.transforms)},
        inputs=describe_inputs(plan.checkpoints),
        reference=reference,
        weights=weights,
        output=str(out_path) if out_path else None,
        num_samples=len(calib) if calib is not None else 0,
        batchnorm=bn_done,
        bn_mode=bn_mode,
        groups=group_report(loaded.spec, saved.alignment, reference),
        warnings=ctx.warnings,
        timings=ctx.timer.timings,
        refit=refitted.section() if refitted else None,
        distill=distilled,
        check=check.to_dict() if check else None,
        evaluation=evaluation,
    ).to_dict()
    if out_path is not None:
        with ctx.timer.phase("write"):
            metadata = provenance(report, data)
            metadata["transforms"] = {
                "name": Path(plan.transforms).name,
                "sha256": report["transforms"]["sha256"],
            }
            write_model(
                loaded.detected.saved_tensors(state), plan.output, inputs, plan.force, metadata
            )
    return MergeResult(state, model, saved.alignment, report)


def data_settings(plan: ApplyPlan, recorded: dict[str, Any], device: str) -> DataSettings:
    """The plan's sample count, seed and batch size where given, else the recorded ones."""
    num_samples = plan.num_samples if plan.num_samples is not None else recorded.get("num_samples")
    seed = plan.seed if plan.seed is not None else int(recorded.get("seed") or 0)
    batch_size = check_batch_size(int(plan.batch_size or recorded.get("batch_size") or 256))
    return DataSettings(
        calibration=plan.data,
        evaluation=plan.eval_data,
        num_samples=num_samples,
        seed=seed,
        batch_size=batch_size,
        device=device,
    )


def refit_settings(plan: ApplyPlan, recorded: dict[str, Any]) -> RefitSettings:
    """The plan's refit settings where given, else the recorded ones."""
    given = {"enabled": plan.refit, "ridge": plan.refit_ridge, "max_rows": plan.refit_max_rows}
    return RefitSettings.from_record(
        {**recorded, **{k: v for k, v in given.items() if v is not None}}
    )


def recorded_distillation(
    ctx: RunContext,
    recorded: dict[str, Any] | None,
    calib: Calibration | None,
    heldout: Calibration | None,
    stream: DataStream | None,
) -> DistillJob | None:
    """The distillation the merge ran, to repeat (None: there was none, or it cannot be
    repeated without calibration data, said in a warning)."""
    if recorded is None:
        if stream is not None:
            raise OptionError("--distill-data: the transforms record no distillation to repeat")
        return None
    if calib is None or heldout is None:
        ctx.warn(
            "the merge was distilled; without its calibration data (--data) the distillation "
            "is not repeated"
        )
        return None
    if recorded["data"] != "calibration" and stream is None:
        raise OptionError(
            f"the merge was distilled on {recorded['data']}: give it again with --distill-data"
        )
    settings = {**recorded["settings"], "augment": tuple(recorded["settings"]["augment"])}
    return DistillJob.of(calib, heldout, stream, DistillSettings(**settings))
