"""Loss and accuracy along the interpolation path between two models.

For two checkpoints A and B and ``t`` on an evenly spaced grid of [0, 1], the
model at ``t`` is the merge of the two with weights ``w = (1 - t, t)``
(docs/cca.md, 'Interpolation barriers')::

    theta(t) = (1 - t) * M_A theta_A U_A  +  t * M_B theta_B U_B

with each method's transforms (``average``: all identities, the naive path).

* Permutation methods (``permutation_only = True``) align B to A once; the
  aligned B computes the same function as B, so both ends of the path are
  the checkpoints' functions.
* Dense methods (CCA, ...) are not function-preserving for the model that is
  transformed, so, as in the paper's code, B is aligned to A (A reference,
  identity transforms on A) for ``t <= 1/2`` and A to B (B reference) for
  ``t > 1/2``. Each side's weight-1 model is then its own untouched tensors.

Statistics are gathered once for both models: the joint covariance is
symmetric in which model is the reference (``AlignContext.reference`` only
selects blocks). Transforms are computed once per method and side, never per
``t``. BatchNorm is handled per ``t`` by :func:`ccamerge.pipeline.build_merged`
(running statistics recomputed, or renormalised, on calibration data).

Endpoints: at ``t = 0`` and ``t = 1`` the curves use the checkpoints
themselves, evaluated once. The path formula gives exactly their tensors there
(weight 1 on the side's reference, whose transforms are the identity), but
with BatchNorm the per-``t`` recomputation of running statistics would change
their function slightly; the endpoints are the models the user trained, so the
barrier is measured against them.

Barriers, with ``L`` the cross-entropy and ``A`` the accuracy on labelled data:

    loss barrier     = max_t  L(t) - ((1 - t) L(0) + t L(1))
    accuracy barrier = max_t  ((1 - t) A(0) + t A(1)) - A(t)

Both are >= 0 (the endpoints contribute 0); the values at ``t = 1/2`` are
reported too when 1/2 is on the grid (odd ``steps``).
"""

from __future__ import annotations

import csv
import dataclasses
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from torch import nn

from ..io.files import check_stdin_once, write_atomic
from ..maths.bn import has_batchnorm
from ..maths.stats import Statistics
from ..methods import MergeMethod, list_methods
from ..models.assumptions import check_settings, describe
from ..pipeline import (
    BatchNormSettings,
    Calibration,
    DataSettings,
    LoadedModels,
    MergeRecipe,
    ModelSource,
    Progress,
    RunContext,
    align_models,
    build_merged,
    check_batch_size,
    check_data_fits,
    evaluate_all,
    gather_statistics,
    load_models,
    make_methods,
    predict_logits,
    read_eval_data,
    resolve_device,
    sample_warnings,
    score_data,
)
from ..runtime.errors import OptionError, remedies
from .options import BATCHNORM_OPTIONS, DATA_OPTIONS, SOURCE_OPTIONS, FromOptions
from .remedies import REMEDIES
from .report import BarrierReport, describe_architecture, samples_scored

if TYPE_CHECKING:  # matplotlib is imported when a plot is drawn, not at start-up
    from matplotlib.figure import Figure

PLOT_SUFFIXES = (".png", ".pdf", ".svg")
DEFAULT_METHODS = ("average", "permute", "cca")


def default_methods() -> list[str]:
    """``average``, ``permute`` and ``cca``, those of them that are registered."""
    known = set(list_methods())
    return [m for m in DEFAULT_METHODS if m in known]


@dataclass
class BarrierPlan(FromOptions):
    """Everything ``ccamerge barrier`` was asked to do, in its settings objects
    (:meth:`from_options` builds it from flat options; ``data.evaluation`` is required).

    ``method_params`` go to every method that takes them (``gamma`` to
    ``cca``, ...); a parameter that no listed method takes is an error.
    """

    checkpoints: list[str]
    data: DataSettings = field(default_factory=DataSettings)
    methods: list[str] = field(default_factory=default_methods)
    steps: int = 11
    method_params: dict[str, Any] = field(default_factory=dict)
    source: ModelSource = field(default_factory=ModelSource)
    batchnorm: BatchNormSettings = field(default_factory=BatchNormSettings)

    OPTIONS: ClassVar[dict[str, tuple[str, str]]] = {
        "arch": SOURCE_OPTIONS["arch"],
        "activation": SOURCE_OPTIONS["activation"],
        **DATA_OPTIONS,
        **BATCHNORM_OPTIONS,
    }


def grid(steps: int) -> list[float]:
    """``steps`` evenly spaced points of [0, 1], exactly 0 and 1 at the ends."""
    if steps < 2:
        raise OptionError(f"--steps must be at least 2, got {steps}")
    return [i / (steps - 1) for i in range(steps)]


def barrier(
    ts: Sequence[float], values: Sequence[float], higher_is_better: bool
) -> tuple[float, float]:
    """``(max_t s * (chord(t) - v(t)), argmax t)`` with ``chord(t) = (1-t) v(0) + t v(1)``.

    ``s = +1`` when higher is better (accuracy), ``-1`` otherwise (loss), so
    the result is how far the curve falls short of the straight line between
    its ends, at its worst. ``ts`` must start at 0 and end at 1.
    """
    v0, v1 = values[0], values[-1]
    sign = 1.0 if higher_is_better else -1.0
    gaps = [sign * ((1 - t) * v0 + t * v1 - v) for t, v in zip(ts, values)]
    k = max(range(len(gaps)), key=gaps.__getitem__)
    return gaps[k], ts[k]


def path_sides(
    method: MergeMethod, loaded: LoadedModels, stats: Statistics | None, base: MergeRecipe
) -> tuple[MergeRecipe, MergeRecipe]:
    """The recipes (``base`` with each side's reference and alignment) for ``t <= 1/2`` and
    ``t > 1/2``.

    One alignment (A reference) for permutation methods; for the others a
    second one with B as the reference, so that weight 1 on either model
    gives back its own tensors."""

    def side(ref: int) -> MergeRecipe:
        aligned = align_models(method, loaded, ref, stats)
        return dataclasses.replace(base, reference=ref).aligned(aligned, method)

    first = side(0)
    if method.permutation_only:
        return first, first
    return first, side(1)


def path_model(
    loaded: LoadedModels,
    sides: tuple[MergeRecipe, MergeRecipe],
    t: float,
    calib: Calibration | None,
    stats: Statistics | None,
) -> tuple[nn.Module, str]:
    """The merged model at ``t`` (weights ``(1 - t, t)``) and what was done to BatchNorm."""
    side = sides[0] if t <= 0.5 else sides[1]
    recipe = dataclasses.replace(side, weights=[1.0 - t, t])
    _, model, bn_done = build_merged(loaded, recipe, calib, stats)
    return model, bn_done


def run_barrier(plan: BarrierPlan, progress: Progress | None = None) -> dict[str, Any]:
    """Evaluate every method's path at every grid point; return the report.

    Report fields: ``checkpoints``, ``architecture``, ``assumptions`` (settings
    checkpoints do not record, :mod:`ccamerge.models.assumptions`), ``methods`` (name ->
    parameters), ``eval_data``, ``t``, ``endpoints`` (two ``{path, t, loss, accuracy}``),
    ``ensemble`` (the two models' logit-averaging ensemble, for reference),
    ``curves`` (method -> ``[{t, loss, accuracy}]``), ``barriers`` (method ->
    ``{loss, accuracy, loss_t, accuracy_t, loss_mid, accuracy_mid}``),
    ``batchnorm`` (method -> what was done at interior points),
    ``num_samples``, ``eval_samples``, ``warnings``, ``timings``.
    """
    if len(plan.checkpoints) != 2:
        raise OptionError(f"barrier takes exactly two checkpoints, got {len(plan.checkpoints)}")
    if plan.data.evaluation is None:
        raise OptionError("barrier needs labelled evaluation data (--eval-data)")
    checkpoints = list(zip(("checkpoint A", "checkpoint B"), plan.checkpoints))
    named = [("--eval-data", plan.data.evaluation), ("--data", plan.data.calibration)]
    check_stdin_once([*checkpoints, *named])
    ctx = RunContext(progress or Progress())
    data = dataclasses.replace(plan.data, device=resolve_device(plan.data.device))
    check_batch_size(data.batch_size)
    ts = grid(plan.steps)
    searched = sorted(k for k, v in plan.method_params.items() if v == "auto")
    if searched:
        raise OptionError(
            f"barrier takes fixed method parameters, not 'auto' ({', '.join(searched)})"
        )
    methods = make_methods(plan.methods, plan.method_params)
    renorm = any(plan.batchnorm.for_method(m).mode == "renorm" for m in methods)
    needy = [m.name for m in methods if m.needs_data]
    if needy and data.calibration is None:
        raise OptionError(f"method(s) {', '.join(needy)} need calibration data (--data)")

    with ctx.timer.phase("load"):
        with remedies(**REMEDIES["barrier"]):
            loaded = load_models(plan.checkpoints, plan.source)
        calib = data.read_calibration()
        if calib is not None:
            check_data_fits(calib.data, loaded, "calibration data")
        eval_data = read_eval_data(data.evaluation, loaded)
    if not loaded.spec.groups and any(m.name != "average" for m in methods):
        ctx.warn(
            "no feature group to align: every method is plain averaging on these models, "
            "so only the average path is drawn"
        )
        methods, needy = make_methods(["average"], {}), []

    stated = plan.source.stated
    ctx.warn(*check_settings(loaded, eval_data, stated, data.batch_size, data.device))
    with ctx.timer.phase("evaluate"):
        evaluation = evaluate_all(loaded, None, eval_data, data.batch_size, data.device)
    ends = [{"loss": m["loss"], "accuracy": m["accuracy"]} for m in evaluation["models"]]
    with_bn = has_batchnorm(loaded.build(loaded.state_dicts[0]))
    if with_bn and calib is None and plan.batchnorm.reset:
        ctx.warn("no calibration data: BatchNorm running statistics were not reset")

    stats = None
    if calib is not None and (needy or (with_bn and renorm)):
        with ctx.timer.phase("statistics"):
            norm_stats = renorm and plan.batchnorm.reset
            stats = gather_statistics(loaded, calib, ctx.progress, norm_stats=norm_stats)
        ctx.warn(*sample_warnings(loaded.spec, stats))

    base = MergeRecipe([0.5, 0.5], 0, plan.batchnorm, data.device)
    curves: dict[str, list[dict[str, float]]] = {}
    bn_done: dict[str, str] = {}
    ctx.progress.start("interpolation", len(methods) * len(ts))
    try:
        for method in methods:
            with ctx.timer.phase("alignment"):
                sides = path_sides(method, loaded, stats, base)
            points = []
            for i, t in enumerate(ts):
                if i in (0, len(ts) - 1):
                    score = ends[0 if i == 0 else 1]
                else:
                    with ctx.timer.phase("interpolate"):
                        model, bn_done[method.name] = path_model(loaded, sides, t, calib, stats)
                    with ctx.timer.phase("evaluate"):
                        logits = predict_logits(model, eval_data, data.batch_size, data.device)
                        score = score_data(logits, eval_data).to_dict()
                points.append({"t": t, "loss": score["loss"], "accuracy": score["accuracy"]})
                ctx.progress.advance(1)
            curves[method.name] = points
    finally:
        ctx.progress.stop()

    if 0.5 not in ts:
        ctx.warn(
            f"t = 1/2 is not on the grid of {plan.steps} steps (use an odd --steps); "
            "loss_mid and accuracy_mid are null"
        )
    return BarrierReport(
        checkpoints=list(plan.checkpoints),
        eval_data=data.evaluation,
        architecture=describe_architecture(loaded.detected),
        assumptions=describe(loaded.detected, stated),
        methods={m.name: m.params() for m in methods},
        steps=plan.steps,
        t=ts,
        endpoints=[
            {"path": p, "t": float(k), **s} for k, (p, s) in enumerate(zip(plan.checkpoints, ends))
        ],
        ensemble=evaluation["ensemble"],
        curves=curves,
        barriers={name: summarise(pts) for name, pts in curves.items()},
        batchnorm=bn_done,
        num_samples=len(calib) if calib is not None else 0,
        eval_samples=len(eval_data),
        warnings=ctx.warnings,
        timings=ctx.timer.timings,
        predicted_tokens=evaluation.get("predicted_tokens"),
    ).to_dict()


def summarise(points: Sequence[dict[str, float]]) -> dict[str, float | None]:
    """Loss and accuracy barriers of one curve, where they peak, and the values at t = 1/2."""
    ts = [p["t"] for p in points]
    loss, loss_t = barrier(ts, [p["loss"] for p in points], higher_is_better=False)
    acc, acc_t = barrier(ts, [p["accuracy"] for p in points], higher_is_better=True)
    mid = next((p for p in points if p["t"] == 0.5), None)
    return {
        "loss": loss,
        "accuracy": acc,
        "loss_t": loss_t,
        "accuracy_t": acc_t,
        "loss_mid": mid["loss"] if mid else None,
        "accuracy_mid": mid["accuracy"] if mid else None,
    }


def plot_barrier(report: dict[str, Any], path: str | Path | None = None) -> Figure:
    """Two panels, loss and accuracy (%) against t, one line per method.

    Drawn on a bare :class:`~matplotlib.figure.Figure` (Agg canvas, no
    pyplot, no display); saved to ``path`` when given (type from the suffix).
    """
    a, b = (Path(p).name for p in report["checkpoints"])
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.2), layout="constrained")
    ax_loss, ax_acc = fig.subplots(1, 2)
    for name, points in report["curves"].items():
        ts = [p["t"] for p in points]
        bar = report["barriers"][name]
        ax_loss.plot(
            ts,
            [p["loss"] for p in points],
            marker="o",
            ms=4,
            label=f"{name} (barrier {bar['loss']:.3f})",
        )
        ax_acc.plot(
            ts,
            [100 * p["accuracy"] for p in points],
            marker="o",
            ms=4,
            label=f"{name} (barrier {100 * bar['accuracy']:.1f} pts)",
        )
    accuracy = "next-token accuracy (%)" if report.get("predicted_tokens") else "accuracy (%)"
    for ax, ylabel in ((ax_loss, "loss (cross-entropy)"), (ax_acc, accuracy)):
        ax.set_xlabel(f"t  (0 = {a}, 1 = {b})")
        ax.set_ylabel(ylabel)
        ax.set_xlim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    data = Path(report["eval_data"]).name
    fig.suptitle(f"Interpolation {a} \u2192 {b}, on {data} ({samples_scored(report)})")
    if path is not None:
        buf = io.BytesIO()
        fig.savefig(buf, dpi=120, format=Path(path).suffix.lstrip(".") or "png")
        write_atomic(path, buf.getvalue())
    return fig


def write_csv(report: dict[str, Any], path: str | Path) -> None:
    """One row per (method, t): ``method,t,loss,accuracy`` with a header."""
    text = io.StringIO(newline="")
    w = csv.writer(text)
    w.writerow(["method", "t", "loss", "accuracy"])
    for name, points in report["curves"].items():
        for p in points:
            w.writerow([name, repr(p["t"]), repr(p["loss"]), repr(p["accuracy"])])
    write_atomic(path, text.getvalue().encode())
