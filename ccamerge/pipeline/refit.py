"""Step 5, refit: the assembled merge refitted layer by layer to the endpoints on the
calibration data (the algorithm: :mod:`ccamerge.maths.refit`, docs/refit.md), with a
progress bar over the layers; when the network cannot be refitted, the merge falls back
to step 4's BatchNorm handling."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..maths.bn import has_batchnorm
from ..maths.refit import RefitReport, RefitSettings, refit
from ..maths.stats import Statistics
from ..runtime.context import Progress, RunContext
from ..runtime.errors import DataError, RefitError
from .assemble import MergeRecipe, assemble, build_merged, needs_norm_statistics, state_of
from .load import Calibration, LoadedModels
from .statistics import gather_statistics


def refit_merged(
    loaded: LoadedModels,
    recipe: MergeRecipe,
    model: nn.Module,
    calib: Calibration,
    settings: RefitSettings,
    progress: Progress | None = None,
) -> RefitReport:
    """Refit the assembled ``model`` in place to the loaded endpoints on ``calib`` (with
    the endpoints' outputs the statistics pass kept, ``calib.kept``, when there are)."""
    progress = progress or Progress()
    endpoints = [loaded.build(sd, calib.device) for sd in loaded.state_dicts]

    def on_layer(name: str, i: int, total: int) -> None:
        if i == 1:
            progress.start("refit", total)
        progress.advance(1)

    try:
        return refit(
            model,
            endpoints,
            loaded.spec,
            recipe.transforms,
            recipe.weights,
            calib.batches,
            settings,
            on_layer,
            calib.kept,
        )
    finally:
        progress.stop()


@dataclass
class Refitted:
    """A merge assembled and refitted (:func:`assemble_and_refit`)."""

    state: dict[str, torch.Tensor]
    model: nn.Module
    report: RefitReport

    @property
    def batchnorm(self) -> str:
        """What happened to the BatchNorms, in the report's words."""
        if not has_batchnorm(self.model):
            return "none (no BatchNorm)"
        return "running statistics written by the refit (no separate reset)"

    def section(self) -> dict[str, Any]:
        """The report's "refit" section (its warnings go to the report's own)."""
        out = self.report.to_dict()
        del out["warnings"]
        return out


def assemble_and_refit(
    loaded: LoadedModels,
    recipe: MergeRecipe,
    calib: Calibration,
    settings: RefitSettings,
    ctx: RunContext,
) -> Refitted | None:
    """Steps 4 and 5 with the refit: assemble without BatchNorm handling, then refit.
    The refit's warnings go to ``ctx``; when the network cannot be refitted
    (:class:`RefitError`), the warning "refit skipped: <reason>" and None (the caller
    then merges without the refit)."""
    with ctx.timer.phase("apply"):
        model = assemble(loaded, recipe)
    if has_batchnorm(model) and len(calib) < 2:
        raise DataError(
            f"the refit's BatchNorm statistics need at least 2 calibration samples; got "
            f"{len(calib)}: give more calibration data, or keep the merged statistics with "
            "--no-refit --no-reset-bn"
        )
    try:
        with ctx.timer.phase("refit"):
            report = refit_merged(loaded, recipe, model, calib, settings, ctx.progress)
    except RefitError as e:
        ctx.warn(f"refit skipped: {e}")
        return None
    ctx.warn(*report.warnings)
    return Refitted(state_of(model, loaded, recipe.reference), model, report)


def refit_or_fix_batchnorm(
    loaded: LoadedModels,
    recipe: MergeRecipe,
    calib: Calibration | None,
    stats: Statistics | None,
    settings: RefitSettings,
    ctx: RunContext,
) -> tuple[dict[str, torch.Tensor], nn.Module, str, Refitted | None]:
    """Steps 4 and 5 as a run takes them: with the refit enabled (and calibration data),
    assemble and refit; without it, or when the network cannot be refitted, assemble and
    fix BatchNorm (:func:`build_merged`), first gathering the BatchNorm outputs' statistics
    when ``stats`` lacks them and renormalisation needs them.
    Returns (state dict, model, what was done to BatchNorm, the refit or None)."""
    if settings.enabled and calib is None:
        ctx.warn("refit skipped: no calibration data (--data)")
    elif settings.enabled:
        refitted = assemble_and_refit(loaded, recipe, calib, settings, ctx)
        if refitted is not None:
            return refitted.state, refitted.model, refitted.batchnorm, refitted
    if calib is not None and not (stats and stats.norms):
        if needs_norm_statistics(loaded, recipe.batchnorm):
            with ctx.timer.phase("statistics"):
                plain = dataclasses.replace(calib, kept=None)  # keep nothing more
                stats = gather_statistics(loaded, plain, ctx.progress, group_stats=False)
    with ctx.timer.phase("apply"):
        state, model, bn_done = build_merged(loaded, recipe, calib, stats)
    return state, model, bn_done, None
