"""Step 2, statistics: run every model on the same calibration batches and gather one
``JointCovariance`` per feature group (and per BatchNorm output, for renormalisation)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx

from ..maths.refit import (
    EndpointOutputs,
    RefitSettings,
    default_memory_budget,
    make_plan,
    output_node,
)
from ..maths.stats import (
    STATS_MODES,
    Statistics,
    available_memory,
    collect_statistics,
    statistics_bytes,
)
from ..methods import (
    MergeMethod,
)
from ..models.spec import MergeSpec
from ..runtime.context import Progress
from ..runtime.errors import OptionError, RefitError
from .load import Calibration, LoadedModels


def gather_statistics(
    loaded: LoadedModels,
    calib: Calibration,
    progress: Progress,
    norm_stats: bool = True,
    **options: Any,
) -> Statistics:
    """Statistics of every model on ``calib``; ``options`` go to :func:`collect_statistics`.
    With ``calib.kept`` (:func:`keep_endpoint_outputs`), the models run through the
    keeper, which keeps their outputs for the refit."""
    models = [loaded.build(sd, calib.device) for sd in loaded.state_dicts]
    if calib.kept is not None:
        options["forward"] = calib.kept.forward
    progress.start("statistics", len(calib))
    try:
        return collect_statistics(
            models,
            loaded.spec,
            calib.batches(),
            calib.device,
            norm_stats=norm_stats,
            on_batch=progress.advance,
            **options,
        )
    finally:
        progress.stop()


def keep_endpoint_outputs(
    loaded: LoadedModels, calib: Calibration, settings: RefitSettings
) -> Calibration:
    """``calib`` with a keeper of the endpoints' outputs at the refit's points
    (``kept``: :func:`gather_statistics` then runs each model through the refit's traced
    plan and keeps them, so that the refit need not run the endpoints again); ``calib``
    as it is when the refit is off, when the network cannot be traced (the refit then
    says why), or when a collection point of the statistics is neither a module call of
    the plan nor the output of a module it traces through (its hook could not be called:
    the refit then runs the endpoints itself)."""
    if not settings.enabled:
        return calib
    model = loaded.build(loaded.state_dicts[0], calib.device)
    try:
        plan = make_plan(model, loaded.spec)
    except RefitError:
        return calib
    calls = {n.target for n in plan.nodes if n.op == "call_module"}
    points = {(g.collect_at, g.collect_on) for g in loaded.spec.groups}
    points |= {(bn, "output") for g in loaded.spec.groups for bn in g.norms}
    routed: dict[fx.Node, list[str]] = {}  # nodes that traced-through modules return
    for name, on in points - {(p, on) for p, on in points if p in calls}:
        node = output_node(plan, name) if on == "output" else None
        if node is None:
            return calib
        routed.setdefault(node, []).append(name)
    budget = settings.memory_budget
    if budget is None:
        budget = default_memory_budget(torch.device(calib.device))
    kept = EndpointOutputs(plan, len(calib), settings.max_rows, budget, routed)
    return dataclasses.replace(calib, kept=kept)


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


def statistics_mode(
    mode: str,
    spec: MergeSpec,
    n_models: int,
    methods: Sequence[MergeMethod],
    memory_limit: int | None = None,
) -> tuple[bool, list[str]]:
    """Whether to gather statistics pairwise (reference x model k), and warnings.

    Joint statistics take ``8 ((N d)^2 + 2 N d)`` bytes per group of width d
    (:func:`ccamerge.maths.stats.statistics_bytes`). ``auto`` switches to pairwise
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
