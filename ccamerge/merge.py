"""The merge executor: one readable pass from checkpoints to a merged file.

``run_merge(plan)`` loads and validates the checkpoints, gathers calibration
statistics, aligns every model to the reference with the chosen method,
transforms and averages the tensors, fixes BatchNorm, optionally evaluates,
and writes the result atomically. It returns a :class:`MergeResult` whose
``report`` is what the CLI prints (rich on stderr, JSON on stdout).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .apply import merge_state_dicts
from .bn import has_batchnorm, renorm_targets, renormalise_batchnorm, reset_batchnorm
from .custom import detect_custom, resolve_spec, save_spec
from .errors import ArchitectureError, CheckpointError, DataError, OptionError
from .evaluate import check_labels, ensemble_logits, predict_logits, score_logits
from .io import (
    Dataset,
    check_output_path,
    load_checkpoint,
    load_data,
    save_safetensors_atomic,
    sha256,
)
from .methods import AlignContext, Alignment, MergeMethod, make_method, method_parameters
from .registry import Detected, detect_architecture
from .select import MIN_HELDOUT, candidate_methods, label, select, split_heldout
from .spec import MergeSpec
from .stats import (
    STATS_MODES,
    Statistics,
    available_memory,
    collect_statistics,
    statistics_bytes,
)

BN_MODES = ("auto", "vector", "renorm")


@dataclass
class MergePlan:
    """Everything ``ccamerge merge`` was asked to do."""

    checkpoints: list[str]
    output: str | None = None
    data: str | None = None
    eval_data: str | None = None
    arch: str | None = None
    model: str | None = None  # a user's factory: pkg.module:fn or file.py:fn (ccamerge.custom)
    model_args: dict[str, Any] = field(default_factory=dict)
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


class Progress:
    """Progress callbacks; the CLI passes a rich implementation. Default: silent."""

    def start(self, task: str, total: int) -> None: ...

    def advance(self, n: int) -> None: ...

    def stop(self) -> None: ...


@dataclass
class LoadedModels:
    """Checkpoints read and checked against one architecture."""

    paths: list[str]
    state_dicts: list[dict[str, torch.Tensor]]
    detected: Detected
    spec: MergeSpec
    warnings: list[str] = field(default_factory=list)  # from feature-group discovery

    def build(self, state_dict: dict[str, torch.Tensor], device: str = "cpu") -> nn.Module:
        model = self.detected.build()
        model.load_state_dict(state_dict, strict=True)
        return model.to(device).eval()


@dataclass
class MergeResult:
    state_dict: dict[str, torch.Tensor]
    model: nn.Module
    alignment: Alignment
    report: dict[str, Any]


def normalise_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    if len(weights) != n:
        raise OptionError(f"{len(weights)} merge weights given for {n} checkpoints")
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise OptionError("merge weights must be finite and non-negative")
    total = float(sum(weights))
    if total <= 0:
        raise OptionError("merge weights must not all be zero")
    return [float(w) / total for w in weights]


def load_models(
    paths: Sequence[str],
    arch: str | None = None,
    model: str | None = None,
    model_args: dict[str, Any] | None = None,
    spec_file: str | None = None,
    input_shape: Sequence[int] | None = None,
) -> LoadedModels:
    """Read every checkpoint, detect the architecture from the first, check the rest fit.

    ``model`` (a factory, see :mod:`ccamerge.custom`) replaces detection; its feature
    groups are discovered on samples of ``input_shape``. ``spec_file`` replaces the groups.
    """
    if not paths:
        raise OptionError("no checkpoints given")
    if model is not None and arch is not None:
        raise OptionError("--model and --arch exclude each other")
    sds = [load_checkpoint(p) for p in paths]
    if model is not None:
        detected = detect_custom(paths[0], sds[0], model, model_args, input_shape)
    else:
        try:
            detected = detect_architecture(sds[0], arch)
        except ArchitectureError as e:
            raise ArchitectureError(f"{paths[0]}: {e}") from None
    spec, notes = resolve_spec(detected, spec_file)
    ref = sds[0]
    template = detected.build()
    expected = template.state_dict()  # the dtypes the model expects
    for path, sd in zip(paths, sds):
        missing = sorted(set(ref) - set(sd))
        extra = sorted(set(sd) - set(ref))
        if missing or extra:
            _check_same_architecture(path, sd, paths[0], detected.name)
            parts = []
            if missing:
                parts.append(f"missing {_few(missing)}")
            if extra:
                parts.append(f"unexpected {_few(extra)}")
            raise ArchitectureError(f"{path} does not match {paths[0]}: {'; '.join(parts)}")
        for name, t in ref.items():
            if sd[name].shape != t.shape:
                raise ArchitectureError(
                    f"{path} does not match {paths[0]}: {name} has shape "
                    f"{tuple(sd[name].shape)}, expected {tuple(t.shape)}"
                )
            want = expected.get(name, t)
            if want.is_floating_point() != sd[name].is_floating_point():
                kind = "floating-point" if want.is_floating_point() else "integer"
                raise CheckpointError(
                    f"{path}: tensor {name} has dtype {sd[name].dtype}, expected a {kind} tensor"
                )
    try:
        spec.validate(ref)
        template.load_state_dict(ref, strict=True)
    except RuntimeError as e:
        raise ArchitectureError(f"{paths[0]} does not load into {detected.name}: {e}") from None
    return LoadedModels(list(paths), sds, detected, spec, notes)


def _check_same_architecture(path: str, sd: dict, first: str, name: str) -> None:
    """Name both architectures when a checkpoint is another kind of network."""
    try:
        other = detect_architecture(sd).name
    except ArchitectureError:
        return
    if other != name:
        raise ArchitectureError(
            f"{path} is a {other} checkpoint but {first} is a {name}; "
            "all checkpoints must share one architecture"
        )


def _few(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def check_data_fits(data: Dataset, loaded: LoadedModels, what: str) -> None:
    """A clear error when samples do not fit the model's input."""
    shape = loaded.detected.input_shape()
    got = tuple(data.x.shape[1:])
    if shape is not None and len(shape) == 1:
        if math.prod(got) != shape[0]:
            raise DataError(
                f"{what} {data.path}: samples of shape {got} ({math.prod(got)} values) do not "
                f"fit {loaded.detected.name} with {shape[0]} inputs"
            )
        return
    if shape is not None and got != tuple(shape):
        raise DataError(
            f"{what} {data.path}: samples of shape {got} do not fit "
            f"{loaded.detected.name}, which takes {tuple(shape)}"
        )
    try:
        with torch.no_grad():
            loaded.build(loaded.state_dicts[0]).eval()(data.x[:2])
    except RuntimeError as e:
        raise DataError(
            f"{what} {data.path}: samples of shape {got} do not fit {loaded.detected.name} "
            f"({str(e).splitlines()[0][:160]})"
        ) from None


def resolve_device(device: str) -> str:
    if device == "cpu":
        return device
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise OptionError(f"--device {device}: CUDA is not available on this machine")
        return device
    raise OptionError(f"unknown device {device!r} (use cpu or cuda)")


def resolve_bn_mode(bn_mode: str, method: MergeMethod) -> str:
    if bn_mode not in BN_MODES:
        raise OptionError(f"--bn-mode must be one of {', '.join(BN_MODES)}")
    if bn_mode != "auto":
        return bn_mode
    return "vector" if method.permutation_only else "renorm"


class Timer:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0


def gather_statistics(
    loaded: LoadedModels,
    calib: Dataset,
    batch_size: int,
    device: str,
    progress: Progress,
    norm_stats: bool = True,
    **options: Any,
) -> Statistics:
    """Statistics of every model on ``calib``; ``options`` go to :func:`collect_statistics`."""
    models = [loaded.build(sd, device) for sd in loaded.state_dicts]
    progress.start("statistics", len(calib))
    try:
        return collect_statistics(
            models,
            loaded.spec,
            calib.batches(batch_size),
            device,
            norm_stats=norm_stats,
            on_batch=progress.advance,
            **options,
        )
    finally:
        progress.stop()


def sample_warnings(spec: MergeSpec, stats: Statistics) -> list[str]:
    """Groups whose covariance is singular (or barely estimated) for lack of rows, and
    groups with dead units (constant on the calibration data)."""
    out = []
    for g in spec.groups:
        jc = stats.groups[g.name]
        rows = jc.n
        if rows < 2 * g.size:
            state = "singular" if rows <= g.size else "poorly estimated"
            out.append(
                f"group {g.name}: {rows} activation rows for {g.size} units per model; the "
                f"covariance is {state} and only the regularisation keeps the transforms "
                f"finite. Use at least {10 * g.size} rows (samples x spatial positions)."
            )
        for k in range(jc.n_models):
            var, mu = torch.diagonal(jc.block(k, k)), jc.mean_of(k)
            dead = int((var <= 1e-9 * (mu**2 + float(var.max().clamp_min(0)))).sum())
            if dead:
                out.append(
                    f"group {g.name}: {dead} of {g.size} units of model {k} are constant on "
                    "the calibration data (dead units); their alignment rests on the "
                    "regularisation alone"
                )
    return out


def build_merged(
    loaded: LoadedModels,
    alignment: Alignment,
    weights: Sequence[float],
    reference: int,
    calib: Dataset | None,
    stats: Statistics | None,
    bn_mode: str,
    reset_bn: bool,
    batch_size: int,
    device: str,
) -> tuple[dict[str, torch.Tensor], nn.Module, str]:
    """Transform and average, then fix BatchNorm (``bn_mode`` "renorm" on a network without
    BatchNorm: REPAIR, :mod:`ccamerge.repair`). Returns (state dict, model, what was done)."""
    Ms, Us = zip(*(alignment.model_transforms(k) for k in range(len(loaded.state_dicts))))
    merged = merge_state_dicts(loaded.state_dicts, loaded.spec, Ms, Us, weights, reference)
    model = loaded.build(merged, device)
    if not has_batchnorm(model):
        bn_done = "none (no BatchNorm)"
        if bn_mode == "renorm" and reset_bn and calib is not None:
            from .repair import repair_merged  # REPAIR: renorm for networks without BN

            n = repair_merged(model, loaded, alignment, weights, calib, batch_size, device)
            if n:
                bn_done = f"no BatchNorm: {n} layers renormalised to aligned targets (REPAIR)"
    elif not reset_bn:
        bn_done = "kept merged running statistics (--no-reset-bn)"
    elif calib is None:
        bn_done = "not reset: no calibration data"
    elif bn_mode == "renorm" and stats is not None and stats.norms:
        targets = {}
        for g in loaded.spec.groups:
            for bn in g.norms:
                targets[bn] = renorm_targets(stats.norms[bn], alignment.groups[g.name].M, weights)
        n = renormalise_batchnorm(model, targets, calib.batches(batch_size), device)
        bn_done = f"renormalised to aligned targets and reset on {n} samples"
    else:
        n = reset_batchnorm(model, calib.batches(batch_size), device)
        bn_done = f"running statistics reset on {n} samples"
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for name, t in loaded.state_dicts[reference].items():
        state[name] = state[name].to(t.dtype)
    return state, model, bn_done


def evaluate_all(
    loaded: LoadedModels,
    merged_model: nn.Module | None,
    data: Dataset,
    batch_size: int,
    device: str,
) -> dict[str, Any]:
    """Scores of the input models, their logit-averaging ensemble and (if given) the merge."""
    logits = [
        predict_logits(loaded.build(sd, device), data, batch_size, device)
        for sd in loaded.state_dicts
    ]
    check_labels(data, logits[0].shape[1])
    evaluation = {
        "models": [
            {"path": p, **score_logits(lg, data.y).to_dict()} for p, lg in zip(loaded.paths, logits)
        ],
        "ensemble": {
            "kind": "mean of logits",
            **score_logits(ensemble_logits(logits), data.y).to_dict(),
        },
        "num_samples": len(data),
    }
    if merged_model is not None:
        merged = predict_logits(merged_model, data, batch_size, device)
        evaluation["merged"] = score_logits(merged, data.y).to_dict()
    return evaluation


def group_report(spec: MergeSpec, alignment: Alignment, reference: int) -> list[dict[str, Any]]:
    rows = []
    for g in spec.groups:
        ga = alignment.groups[g.name]
        q = [v for k, v in enumerate(ga.quality) if k != reference and v is not None]
        mins = [
            v
            for k, v in enumerate(ga.details.get("min_correlation", []))
            if k != reference and v is not None
        ]
        conds = [
            v for k, v in enumerate(ga.details.get("cond", [])) if k != reference and v is not None
        ]
        rows.append(
            {
                "name": g.name,
                "size": g.size,
                "mean_correlation": sum(q) / len(q) if q else None,
                "min_correlation": min(mins) if mins else None,
                "condition_number": max(conds) if conds else None,
                "per_model": ga.quality,
            }
        )
    return rows


def parse_reference(reference: int | str, n: int) -> int | None:
    """``"first"`` -> 0, an index in [0, n) -> itself, ``"best"`` -> None (chosen on data)."""
    text = str(reference).strip().lower()
    if text == "first":
        return 0
    if text == "best":
        return None
    try:
        index = int(text)
    except ValueError:
        raise OptionError(
            f"--reference must be first, best or a model index, not {str(reference)!r}"
        ) from None
    if not 0 <= index < n:
        raise OptionError(f"reference index {index} is out of range for {n} checkpoints")
    return index


def choose_best_reference(
    loaded: LoadedModels,
    eval_data: Dataset | None,
    calib: Dataset | None,
    batch_size: int,
    device: str,
) -> tuple[int, dict[str, Any]]:
    """The model with the highest accuracy on ``eval_data`` (ties: lower loss), or without
    it the lowest cross-entropy on the labelled calibration data."""
    if eval_data is not None:
        data, by = eval_data, "accuracy on the evaluation data"
    elif calib is not None and calib.y is not None:
        data, by = calib, "cross-entropy on the calibration data"
    else:
        raise OptionError(
            "--reference best needs labelled data: --eval-data, or calibration data with labels 'y'"
        )
    scores = []
    for sd in loaded.state_dicts:
        logits = predict_logits(loaded.build(sd, device), data, batch_size, device)
        check_labels(data, logits.shape[1])
        scores.append(score_logits(logits, data.y))
    if eval_data is not None:
        best = max(range(len(scores)), key=lambda k: (scores[k].accuracy, -scores[k].loss, -k))
    else:
        best = min(range(len(scores)), key=lambda k: (scores[k].loss, k))
    return best, {"rule": "best", "by": by, "scores": [sc.to_dict() for sc in scores]}


def statistics_mode(
    mode: str,
    spec: MergeSpec,
    n_models: int,
    methods: Sequence[MergeMethod],
    memory_limit: int | None = None,
) -> tuple[bool, list[str]]:
    """Whether to gather statistics pairwise (reference x model k), and warnings.

    Joint statistics take ``8 ((N d)^2 + 2 N d)`` bytes per group of width d
    (:func:`ccamerge.stats.statistics_bytes`). ``auto`` switches to pairwise
    blocks when that exceeds ``memory_limit`` (default: half the available RAM).
    A method that needs every cross-model block (``needs_all_blocks``) is refused
    rather than left to run out of memory."""
    if mode not in STATS_MODES:
        raise OptionError(f"statistics mode must be one of {', '.join(STATS_MODES)}, not {mode!r}")
    needs_all = [m.name for m in methods if getattr(m, "needs_all_blocks", False)]
    if mode == "pairwise" and needs_all:
        raise OptionError(
            f"method {needs_all[0]!r} needs the joint covariance of all models; pairwise "
            "statistics do not hold the blocks between non-reference models"
        )
    if memory_limit is None:
        available = available_memory()
        limit = None if available is None else available // 2
        where = "half the available RAM"
    else:
        limit, where = memory_limit, "the memory limit"
    joint = statistics_bytes(spec, n_models, "joint")
    pairwise = statistics_bytes(spec, n_models, "pairwise")
    if limit is None or joint <= limit or mode == "pairwise":
        return mode == "pairwise", []
    gib = 2.0**30
    if mode == "joint":
        return False, [
            f"joint statistics need {joint / gib:.2f} GiB, more than {where} "
            f"({limit / gib:.2f} GiB); they may not fit in memory"
        ]
    if needs_all:
        raise OptionError(
            f"method {needs_all[0]!r} needs the joint covariance of all {n_models} models: "
            f"{joint / gib:.2f} GiB, more than {where} ({limit / gib:.2f} GiB); "
            "merge fewer models or use another method"
        )
    notes = [
        f"joint statistics would need {joint / gib:.2f} GiB, more than {where} "
        f"({limit / gib:.2f} GiB): gathered the blocks with the reference pairwise instead "
        f"({pairwise / gib:.2f} GiB)"
    ]
    if pairwise > limit:
        notes.append(f"pairwise statistics still need {pairwise / gib:.2f} GiB; they may not fit")
    return True, notes


def run_merge(plan: MergePlan, progress: Progress | None = None) -> MergeResult:
    progress = progress or Progress()
    timer = Timer()
    device = resolve_device(plan.device)
    candidates = candidate_methods(plan.method, plan.method_params)
    method, auto = candidates[0], len(candidates) > 1
    bn_modes = {resolve_bn_mode(plan.bn_mode, m) for m in candidates}
    bn_mode = "renorm" if "renorm" in bn_modes else bn_modes.pop()
    if plan.batch_size <= 0:
        raise OptionError(f"--batch-size must be positive, got {plan.batch_size}")
    out_path = check_output_path(plan.output, plan.checkpoints, plan.force) if plan.output else None
    transforms_path = None
    if plan.save_transforms is not None:
        transforms_path = check_output_path(plan.save_transforms, plan.checkpoints, plan.force)
        if out_path is not None and transforms_path.resolve() == out_path.resolve():
            raise OptionError("--save-transforms and --output name the same file")
    n = len(plan.checkpoints)
    reference = parse_reference(plan.reference, n)
    weights = normalise_weights(plan.weights, n)
    if any(m.needs_data for m in candidates) and plan.data is None:
        raise OptionError(f"method {method.name!r} needs calibration data (--data)")
    if auto and plan.data is None:
        raise OptionError("automatic selection (gamma or method 'auto') needs calibration data (--data)")

    with timer.phase("load"):
        calib = None
        if plan.data is not None:
            calib = load_data(plan.data).subset(
                plan.num_samples, plan.seed if plan.num_samples else None
            )
        shape = tuple(calib.x.shape[1:]) if calib is not None else None
        loaded = load_models(
            plan.checkpoints, plan.arch, plan.model, plan.model_args, plan.spec, shape
        )
        if calib is not None:
            check_data_fits(calib, loaded, "calibration data")
        eval_data = None
        if plan.eval_data is not None:
            eval_data = load_data(plan.eval_data, require_labels=True)
            check_data_fits(eval_data, loaded, "evaluation data")
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
    if auto and calib is not None and len(calib) < 2 * MIN_HELDOUT:
        fixed = {
            k: v
            for k, v in plan.method_params.items()
            if v != "auto" and k in method_parameters("cca")
        }
        method, auto = make_method("cca", **fixed), False
        warnings.append(
            f"automatic selection needs at least {2 * MIN_HELDOUT} calibration samples "
            f"(got {len(calib)}); merged with {label(method)} instead"
        )
    stats = None
    split = split_heldout(calib, plan.heldout_fraction, plan.seed) if auto and calib else None
    if split is not None:
        calib = split.stats  # the held-out part never feeds statistics or BN reset
    if calib is not None and (method.needs_data or bn_mode == "renorm"):
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
                norm_stats=bn_mode == "renorm" and plan.reset_bn,  # the targets' statistics
            )
        warnings += sample_warnings(loaded.spec, stats)

    selection = None
    if split is not None:
        with timer.phase("selection"):
            winner, scored, state, model, bn_done = select(
                loaded, stats, candidates, split, weights, reference,
                lambda m: resolve_bn_mode(plan.bn_mode, m), plan.reset_bn,
                plan.batch_size, device, plan.select_by,
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
            ctx = AlignContext(loaded.spec, loaded.state_dicts, reference, stats)
            alignment = method.align(ctx)
        with timer.phase("apply"):
            state, model, bn_done = build_merged(
                loaded, alignment, weights, reference, calib, stats, bn_mode,
                plan.reset_bn, plan.batch_size, device,
            )
    if calib is None and has_batchnorm(model) and plan.reset_bn:
        warnings.append("no calibration data: BatchNorm running statistics were not reset")

    evaluation = None
    if eval_data is not None:
        with timer.phase("evaluate"):
            evaluation = evaluate_all(loaded, model, eval_data, plan.batch_size, device)

    report: dict[str, Any] = {
        "ccamerge_version": __version__,
        "architecture": {"name": loaded.detected.name, "config": loaded.detected.config},
        "method": method.name,
        "params": method.params(),
        "inputs": [{"path": p, "sha256": sha256(p)} for p in plan.checkpoints],
        "reference": reference,
        "reference_choice": reference_choice,
        "weights": weights,
        "output": str(out_path) if out_path else None,
        "num_samples": stats.num_samples if stats else 0,
        "batchnorm": bn_done,
        "bn_mode": bn_mode,
        "groups": group_report(loaded.spec, alignment, reference),
        "warnings": warnings,
        "timings": timer.timings,
    }
    if selection is not None:
        report["selection"] = selection
    if evaluation is not None:
        report["evaluation"] = evaluation

    if out_path is not None:
        with timer.phase("write"):
            check_output_path(out_path, plan.checkpoints, plan.force)  # again: minutes passed
            save_safetensors_atomic(state, out_path, provenance(report, plan))
    if transforms_path is not None:
        from .transforms import save_transforms  # here: transforms.py builds on this module

        with timer.phase("write"):
            check_output_path(transforms_path, plan.checkpoints, plan.force)
            save_transforms(transforms_path, alignment, loaded, report, plan)
    if plan.spec_out is not None:  # last, so that a failed merge writes nothing
        save_spec(plan.spec_out, loaded.spec, warnings=loaded.warnings)
    return MergeResult(state, model, alignment, report)


def provenance(report: dict[str, Any], plan: MergePlan) -> dict[str, Any]:
    """The output file's metadata: how it was made."""
    return {
        "format": "pt",
        "ccamerge_version": report["ccamerge_version"],
        "architecture": report["architecture"],
        "method": report["method"],
        "params": report["params"],
        "inputs": [{"name": Path(i["path"]).name, "sha256": i["sha256"]} for i in report["inputs"]],
        "reference": report["reference"],
        "weights": report["weights"],
        "num_samples": report["num_samples"],
        "calibration_data": Path(plan.data).name if plan.data else None,
        "seed": plan.seed,
        "batchnorm": report["batchnorm"],
    }


def merge(checkpoints: Sequence[str], **options: Any) -> MergeResult:
    """Python entry point: ``merge(["a.pt", "b.pt"], data="calib.npz", output="m.safetensors")``.

    Keyword options are the fields of :class:`MergePlan`."""
    names = {f.name for f in dataclasses.fields(MergePlan)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise OptionError(f"unknown option(s) {', '.join(unknown)}")
    return run_merge(MergePlan(checkpoints=[str(c) for c in checkpoints], **options))
