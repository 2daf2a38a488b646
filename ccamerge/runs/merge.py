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
from typing import Any, ClassVar

import torch
from torch import nn

from ..io.files import (
    OUTPUT_SUFFIXES,
    Dataset,
    DataStream,
    check_outputs,
    check_stdin_once,
    open_stream,
)
from ..maths.bn import has_batchnorm
from ..methods import Alignment, MergeMethod, list_methods, make_method, method_parameters
from ..models.assumptions import check_settings, describe
from ..models.custom import save_spec
from ..pipeline import (
    MIN_HELDOUT,
    AlignSettings,
    BatchNormSettings,
    Calibration,
    CheckSettings,
    DataSettings,
    Distillation,
    DistillJob,
    LoadedModels,
    MergeCheck,
    MergeRecipe,
    MergeResult,
    ModelSource,
    Progress,
    RefitSettings,
    RunContext,
    Scored,
    Split,
    align_models,
    aligned_parameters,
    aligned_warning,
    check_augmentable,
    check_batch_size,
    check_data_fits,
    check_labels,
    check_merge,
    choose_best_reference,
    distill_merged,
    evaluate_all,
    gather_statistics,
    group_report,
    hold_out,
    keep_endpoint_outputs,
    label,
    load_models,
    normalise_weights,
    parse_reference,
    predict_logits,
    provenance,
    read_eval_data,
    recorded_settings,
    refit_or_fix_batchnorm,
    resolve_bn_mode,
    resolve_device,
    sample_warnings,
    save_transforms,
    select,
    split_heldout,
    state_of,
    statistics_mode,
    write_model,
)
from ..runtime.errors import DataError, OptionError, remedies
from .options import BATCHNORM_OPTIONS, DATA_OPTIONS, SOURCE_OPTIONS, FromOptions
from .remedies import REMEDIES
from .report import MergeReport, describe_architecture, describe_inputs


@dataclass
class MergePlan(FromOptions):
    """Everything ``ccamerge merge`` was asked to do, in its settings objects;
    :meth:`from_options` builds it from the flat options (:data:`MergePlan.OPTIONS`)."""

    checkpoints: list[str]
    output: str | None = None
    source: ModelSource = field(default_factory=ModelSource)
    data: DataSettings = field(default_factory=DataSettings)
    align: AlignSettings = field(default_factory=AlignSettings)
    batchnorm: BatchNormSettings = field(default_factory=BatchNormSettings)
    refit: RefitSettings = field(default_factory=RefitSettings)
    distill: Distillation = field(default_factory=Distillation)
    check: CheckSettings = field(default_factory=CheckSettings)
    weights: list[float] | None = None
    reference: int | str = 0  # an index, "first" or "best"
    force: bool = False
    save_transforms: str | None = None
    spec_out: str | None = None  # write the feature groups used to this JSON file

    # flat option -> (settings field, its field): the CLI's flags and merge()'s keywords
    OPTIONS: ClassVar[dict[str, tuple[str, str]]] = {
        **SOURCE_OPTIONS,
        **DATA_OPTIONS,
        "method": ("align", "method"),
        "method_params": ("align", "params"),
        "select_by": ("align", "select_by"),
        "heldout_fraction": ("align", "heldout_fraction"),
        "stats_mode": ("align", "stats_mode"),
        "memory_limit": ("align", "memory_limit"),
        **BATCHNORM_OPTIONS,
        "refit": ("refit", "enabled"),
        "refit_ridge": ("refit", "ridge"),
        "refit_max_rows": ("refit", "max_rows"),
        "distill": ("distill", "epochs"),
        "augment": ("distill", "augment"),
        "distill_settings": ("distill", "settings"),
        "check": ("check", "enabled"),
        "check_fraction": ("check", "fraction"),
    }


def run_merge(plan: MergePlan, progress: Progress | None = None) -> MergeResult:
    """Load, gather statistics, align (or select), assemble and refit, evaluate, write.
    ``plan.data.device`` "cuda" becomes this process's GPU under torchrun."""
    check_stdin_once(named_inputs(plan))
    ctx = RunContext(progress or Progress())
    data = dataclasses.replace(plan.data, device=resolve_device(plan.data.device))
    plan = dataclasses.replace(plan, data=data)
    candidates = check_plan(plan)
    method, auto = candidates[0], len(candidates) > 1
    bn_modes = {resolve_bn_mode(plan.batchnorm.mode, m) for m in candidates}
    renorm = "renorm" in bn_modes
    inputs, output_files = run_inputs(plan), output_options(plan)
    outputs = check_outputs(output_files, inputs, plan.force)
    n = len(plan.checkpoints)
    weights = normalise_weights(plan.weights, n)
    with ctx.timer.phase("load"):
        loaded, calib, eval_data = load_inputs(plan.checkpoints, plan.source, data)
        reference, reference_choice = choose_reference(plan, loaded, calib, eval_data)
        stream = open_distill_data(data.distillation, loaded)
        if calib is not None:
            shape = stream.sample_shape if stream else tuple(calib.data.x.shape[1:])
            check_augmentable(plan.distill.augment, shape)
    warn_about_inputs(ctx, plan, loaded, calib, eval_data)
    if not loaded.spec.groups and any(m.name != "average" for m in candidates):
        candidates = [make_method("average")]  # every candidate would give the same merge
        method, auto = candidates[0], False
        renorm = resolve_bn_mode(plan.batchnorm.mode, method) == "renorm"
        ctx.warn("no feature group to align: the models are merged by plain averaging")
    refit = dataclasses.replace(plan.refit, enabled=plan.refit.enabled and calib is not None)
    if auto and calib is not None and len(calib) < 2 * MIN_HELDOUT:
        method, auto = fixed_candidate(method, plan.align.params), False
        ctx.warn(
            f"automatic selection needs at least {2 * MIN_HELDOUT} calibration samples "
            f"(got {len(calib)}); merged with {label(method)} instead"
        )
    stats = None
    calib, split, heldout = held_out_parts(ctx, plan, calib, auto)
    if plan.distill.enabled and heldout is None:
        raise DataError(
            "--distill scores every epoch on the check's held-out calibration samples: give "
            f"at least {2 * MIN_HELDOUT} calibration samples and keep the check (--check)"
        )
    # the plain merges that selection scores fix BatchNorm; a refitted merge does not
    bn_fixed = not refit.enabled or split is not None
    if calib is not None and (method.needs_data or (renorm and bn_fixed)):
        pairwise, notes = statistics_mode(
            plan.align.stats_mode, loaded.spec, n, candidates, plan.align.memory_limit
        )
        ctx.warn(*notes)
        with ctx.timer.phase("statistics"):
            calib = keep_endpoint_outputs(loaded, calib, refit)  # for the refit
            stats = gather_statistics(
                loaded,
                calib,
                ctx.progress,
                pairwise=pairwise,
                reference=reference,
                # the renormalisation targets' statistics
                norm_stats=renorm and plan.batchnorm.reset and bn_fixed,
            )
        ctx.warn(*sample_warnings(loaded.spec, stats))

    recipe = MergeRecipe(weights, reference, plan.batchnorm, data.device)
    selection = None
    if split is not None:
        with ctx.timer.phase("selection"):
            winner, scored, state, model, bn_done = select(
                loaded, stats, candidates, split, recipe, plan.align.select_by
            )
        method, alignment = winner.method, winner.alignment
        selection = selection_section(plan.align, split, scored, method)
    else:
        with ctx.timer.phase("alignment"):
            alignment = align_models(method, loaded, reference, stats)
    recipe = recipe.aligned(alignment, method)
    refitted = None
    if split is None or refit.enabled:  # else: the selection's winner as it was scored
        state, model, bn_done, refitted = refit_or_fix_batchnorm(
            loaded, recipe, calib, stats, refit, ctx
        )
    if calib is None and has_batchnorm(model) and plan.batchnorm.reset:
        ctx.warn("no calibration data: BatchNorm running statistics were not reset")
    job = None
    if plan.distill.enabled:
        job = DistillJob.of(calib, heldout, stream, plan.distill.resolved(data.seed))
    distilled, check, trained = distill_and_check(ctx, loaded, recipe, model, heldout, job)
    state = trained or state
    evaluation = None
    if eval_data is not None:
        with ctx.timer.phase("evaluate"):
            evaluation = evaluate_all(loaded, model, eval_data, data.batch_size, data.device)
    aligned = aligned_section(ctx, plan, loaded, model, alignment)

    report = MergeReport(
        architecture=describe_architecture(loaded.detected),
        assumptions=describe(loaded.detected, plan.source.stated),
        method=method.name,
        params=method.params(),
        aligned=aligned,
        inputs=describe_inputs(plan.checkpoints),
        reference=reference,
        reference_choice=reference_choice,
        weights=weights,
        output=str(outputs[0]) if outputs[0] else None,
        num_samples=stats.num_samples if stats else len(calib) if refitted else 0,
        batchnorm=bn_done,
        bn_mode=recipe.batchnorm.mode,
        groups=group_report(loaded.spec, alignment, reference),
        warnings=ctx.warnings,
        timings=ctx.timer.timings,
        selection=selection,
        refit=refitted.section() if refitted else None,
        distill=distilled,
        check=check.to_dict() if check else None,
        evaluation=evaluation,
    ).to_dict()
    result = MergeResult(state, model, alignment, report)
    with ctx.timer.phase("write"):
        write_outputs(plan, loaded, result)
    return result


def aligned_section(
    ctx: RunContext, plan: MergePlan, loaded: LoadedModels, model: nn.Module, alignment: Alignment
) -> dict[str, Any]:
    """The report's ``aligned``; under half aligned, a warning (unless averaging was asked)."""
    aligned = aligned_parameters(loaded.spec, model, alignment, loaded.unaligned_layers)
    if plan.align.method != "average":
        ctx.warn(aligned_warning(aligned) or "")
    return aligned


def distill_and_check(
    ctx: RunContext,
    loaded: LoadedModels,
    recipe: MergeRecipe,
    model: nn.Module,
    heldout: Calibration | None,
    job: DistillJob | None,
) -> tuple[dict[str, Any] | None, MergeCheck | None, dict[str, torch.Tensor] | None]:
    """The last steps of a merge and of ``apply``: distil ``model`` in place (with a
    ``job``), then check it on the held-out samples (with ``heldout``). Returns the report's
    "distill" section, the check, and the distilled state dict (None: not distilled)."""
    distilled = trained = None
    if job is not None:
        distilled = distill_merged(loaded, recipe, model, job, ctx).to_dict() | job.source
        trained = state_of(model, loaded, recipe.reference)  # the model scores what is written
    check = None
    if heldout is not None:
        with ctx.timer.phase("check"):
            check = check_merge(loaded, model, heldout, recipe.weights)
        ctx.warn(check.warning(distilled=job is not None))
    return distilled, check, trained


def check_plan(plan: MergePlan) -> list[MergeMethod]:
    """The candidate methods, after checking the options that need no file."""
    plan.refit.check()
    plan.check.check()
    if plan.distill.enabled:
        plan.distill.resolved(plan.data.seed)  # every setting checked before any work
        if not plan.check.enabled:
            raise OptionError(
                "--distill scores its epochs on the check's held-out samples: drop --no-check"
            )
        if plan.data.calibration is None:
            raise OptionError("--distill needs calibration data (--data)")
    elif plan.data.distillation is not None or plan.distill.augment:
        raise OptionError("--distill-data and --augment go with --distill")
    check_batch_size(plan.data.batch_size)
    candidates = plan.align.candidates(plan.refit.enabled)
    needy = len(candidates) > 1 or any(m.needs_data for m in candidates)
    if plan.data.calibration is None and needy:
        free = " or ".join(m for m in list_methods() if not make_method(m).needs_data)
        raise OptionError(
            f"method {plan.align.method!r} needs calibration data: pass model-ready inputs "
            "with --data FILE (.npz, .npy, .pt, .safetensors; '-' reads standard input), or "
            f"merge without data with --method {free}"
        )
    return candidates


def choose_reference(
    plan: MergePlan, loaded: LoadedModels, calib: Calibration | None, eval_data: Dataset | None
) -> tuple[int, dict[str, Any]]:
    """The reference model's index and how it was chosen (``--reference best``: on data)."""
    reference = parse_reference(plan.reference, len(plan.checkpoints))
    if reference is not None:
        return reference, {"rule": "first" if str(plan.reference) == "first" else "index"}
    calib_data = calib.data if calib else None
    data = plan.data
    return choose_best_reference(loaded, eval_data, calib_data, data.batch_size, data.device)


def warn_about_inputs(
    ctx: RunContext,
    plan: MergePlan,
    loaded: LoadedModels,
    calib: Calibration | None,
    eval_data: Dataset | None,
) -> None:
    """The warnings the inputs give before any merging: discovery's, data scale, the
    settings checkpoints do not record, options that have no effect."""
    ctx.warn(*loaded.warnings)
    calib_data = calib.data if calib is not None else None
    for dataset, what in ((calib_data, "calibration data"), (eval_data, "evaluation data")):
        ctx.warn(dataset.scale_warning(what) if dataset is not None else "")
    labelled = eval_data if eval_data is not None else calib_data
    data = plan.data
    ctx.warn(*check_settings(loaded, labelled, plan.source.stated, data.batch_size, data.device))
    if plan.refit.enabled and calib is None:
        ctx.warn("refit skipped: no calibration data (--data)")
    if plan.refit.enabled and calib is not None and not plan.batchnorm.reset:
        ctx.warn(
            "--no-reset-bn has no effect with the refit, which writes the BatchNorm statistics "
            "itself (--no-refit keeps the averaged ones)"
        )


def held_out_parts(
    ctx: RunContext, plan: MergePlan, calib: Calibration | None, auto: bool
) -> tuple[Calibration | None, Split | None, Calibration | None]:
    """``(what the merge fits on, the selection's split, the check's held-out samples)``:
    with a search, its held-out part serves the check too; else the check holds out its
    own fraction (none: too few samples, said in a warning, or ``--no-check``)."""
    if calib is None:
        return None, None, None
    seed = plan.data.seed
    if auto:
        split = split_heldout(calib, plan.align.heldout_fraction, seed)
        return split.stats, split, split.heldout
    if not plan.check.enabled:
        return calib, None, None
    held = hold_out(calib, plan.check, seed)
    if isinstance(held, str):
        ctx.warn(held)
        return calib, None, None
    return held.stats, None, held.heldout


def open_distill_data(path: str | None, loaded: LoadedModels) -> DataStream | None:
    """``--distill-data``, checked against the model's input (None without it)."""
    if path is None:
        return None
    stream = open_stream(path)
    first = next(stream.chunks())
    check_data_fits(Dataset(first, None, stream.path), loaded, "distillation data")
    return stream


def fixed_candidate(method: MergeMethod, params: dict[str, Any]) -> MergeMethod:
    """``method`` with its ``'auto'`` parameters at their defaults (too few samples to search)."""
    fixed = {k: v for k, v in params.items() if v != "auto" and k in method_parameters(method.name)}
    return make_method(method.name, **fixed)


def selection_section(
    align: AlignSettings, split: Split, scored: list[Scored], winner: MergeMethod
) -> dict[str, Any]:
    """The report's "selection" section: every candidate's score and the winner."""
    return {
        "select_by": align.select_by,
        "heldout_samples": len(split.heldout),
        "candidates": [c.to_dict() for c in scored],
        "winner": label(winner),
    }


def write_outputs(plan: MergePlan, loaded: LoadedModels, result: MergeResult) -> None:
    """The merged file, the transforms file and the spec file, each where asked; the
    output paths checked again first (minutes passed since the first check)."""
    inputs = run_inputs(plan)
    out_path, transforms_path, spec_path = check_outputs(output_options(plan), inputs, plan.force)
    if out_path is not None:
        metadata = provenance(result.report, plan.data)
        state = loaded.detected.saved_tensors(result.state_dict)
        write_model(state, plan.output, inputs, plan.force, metadata)
    if transforms_path is not None:
        report = result.report
        fraction = None  # of the samples held out of the merge: selection's, else the check's
        if "selection" in report or "check" in report:
            fraction = plan.align.heldout_fraction if "selection" in report else plan.check.fraction
        recorded = recorded_settings(plan.data, fraction, plan.refit, distill_record(report))
        save_transforms(transforms_path, result.alignment, loaded, report, recorded)
    if spec_path is not None:  # last, so that a failed merge writes nothing
        save_spec(spec_path, loaded.spec, warnings=loaded.warnings)


def distill_record(report: dict[str, Any]) -> dict[str, Any] | None:
    """What a file records of the distillation: its settings and the data it trained on."""
    distill = report.get("distill")
    return None if distill is None else {"settings": distill["settings"], "data": distill["data"]}


def load_inputs(
    checkpoints: Sequence[str], source: ModelSource, data: DataSettings
) -> tuple[LoadedModels, Calibration | None, Dataset | None]:
    """Step 1 as a merge takes it: the calibration data first (its sample shape feeds
    feature-group discovery), the models, the evaluation data; each checked against the
    others."""
    calib = data.read_calibration()
    shape = tuple(calib.data.x.shape[1:]) if calib is not None else None
    tokens = calib is not None and calib.data.tokens
    with remedies(**REMEDIES["merge"]):
        loaded = load_models(checkpoints, source, shape, tokens)
    if calib is not None:
        check_data_fits(calib.data, loaded, "calibration data")
    eval_data = read_eval_data(data.evaluation, loaded)
    if eval_data is not None:
        # labels out of range: say so now, not after the merge
        outputs = predict_logits(loaded.build(loaded.state_dicts[0]), eval_data.subset(1))
        check_labels(eval_data, outputs.shape[1])
    return loaded, calib, eval_data


def named_inputs(plan: MergePlan) -> list[tuple[str, str | None]]:
    """Every input of the merge, ``(what, path or None)``."""
    checkpoints = [(f"checkpoint {k}", c) for k, c in enumerate(plan.checkpoints)]
    return [
        *checkpoints,
        ("--data", plan.data.calibration),
        ("--eval-data", plan.data.evaluation),
        ("--distill-data", plan.data.distillation),
        ("--spec", plan.source.spec),
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

    Keyword options are those of :data:`MergePlan.OPTIONS` and the plan's plain fields."""
    return run_merge(MergePlan.from_options(checkpoints, **options))
