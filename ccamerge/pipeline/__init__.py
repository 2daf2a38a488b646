"""The merge pipeline, one module per step, in the order a merge runs them:

    load -> statistics -> align -> assemble -> refit -> evaluate -> write

``select`` runs align and assemble for each candidate of ``--gamma auto`` /
``--method auto`` and scores it with evaluate; ``transforms`` is the saved
transforms file (written after a merge, read by ``ccamerge apply``); ``check``
compares the merge and each input with the ensemble on held-out data. A step
imports only the steps before it; the runs (:mod:`ccamerge.runs.merge`,
:mod:`ccamerge.runs.apply`, :mod:`ccamerge.runs.barrier`) and the benchmarks import
the names below.
"""

from __future__ import annotations

from ..maths.refit import DEFAULT_MAX_ROWS, DEFAULT_RIDGE, LayerFit, RefitReport, RefitSettings
from ..methods.cca import GAMMA_GRID, REFIT_GAMMA
from ..runtime.context import Progress, RunContext, Timer
from .align import (
    AlignSettings,
    align_models,
    aligned_parameters,
    aligned_warning,
    auto_methods,
    candidate_methods,
    group_report,
    label,
    make_methods,
)
from .assemble import (
    BN_MODES,
    BatchNormSettings,
    MergeRecipe,
    assemble,
    build_merged,
    fix_batchnorm,
    needs_norm_statistics,
    resolve_bn_mode,
    state_of,
)
from .check import (
    CHECK_FRACTION,
    Agreement,
    CheckSettings,
    MergeCheck,
    check_merge,
    check_outputs,
    hold_out,
)
from .distill import (
    Distillation,
    DistillJob,
    check_augmentable,
    distill_merged,
    parse_augment,
    parse_epochs,
)
from .evaluate import (
    Score,
    check_labels,
    choose_best_reference,
    ensemble_logits,
    evaluate,
    evaluate_all,
    labels_of,
    next_token,
    predict_logits,
    score_data,
    score_logits,
)
from .load import (
    Calibration,
    DataSettings,
    LoadedModels,
    ModelSource,
    check_batch_size,
    check_data_fits,
    load_models,
    normalise_weights,
    parse_reference,
    read_calibration,
    read_eval_data,
    resolve_device,
)
from .refit import Refitted, assemble_and_refit, refit_merged, refit_or_fix_batchnorm
from .select import MIN_HELDOUT, Scored, Split, score_outputs, select, split_heldout
from .statistics import (
    gather_statistics,
    keep_endpoint_outputs,
    sample_warnings,
    statistics_mode,
)
from .transforms import (
    SavedTransforms,
    check_fits,
    load_transforms,
    recorded_settings,
    save_transforms,
)
from .write import MergeResult, provenance, write_model

__all__ = [
    "Agreement",
    "AlignSettings",
    "BN_MODES",
    "CHECK_FRACTION",
    "BatchNormSettings",
    "CheckSettings",
    "DistillJob",
    "Distillation",
    "Calibration",
    "DEFAULT_MAX_ROWS",
    "DEFAULT_RIDGE",
    "DataSettings",
    "GAMMA_GRID",
    "LayerFit",
    "LoadedModels",
    "MIN_HELDOUT",
    "MergeCheck",
    "MergeRecipe",
    "MergeResult",
    "ModelSource",
    "Progress",
    "REFIT_GAMMA",
    "RefitReport",
    "RefitSettings",
    "Refitted",
    "RunContext",
    "SavedTransforms",
    "Scored",
    "Score",
    "Split",
    "Timer",
    "align_models",
    "aligned_parameters",
    "aligned_warning",
    "assemble",
    "assemble_and_refit",
    "auto_methods",
    "build_merged",
    "candidate_methods",
    "check_augmentable",
    "check_batch_size",
    "check_data_fits",
    "check_fits",
    "check_labels",
    "check_merge",
    "distill_merged",
    "hold_out",
    "parse_augment",
    "parse_epochs",
    "check_outputs",
    "choose_best_reference",
    "ensemble_logits",
    "evaluate",
    "evaluate_all",
    "fix_batchnorm",
    "gather_statistics",
    "keep_endpoint_outputs",
    "group_report",
    "label",
    "load_models",
    "load_transforms",
    "make_methods",
    "needs_norm_statistics",
    "normalise_weights",
    "parse_reference",
    "labels_of",
    "next_token",
    "predict_logits",
    "provenance",
    "read_calibration",
    "read_eval_data",
    "recorded_settings",
    "refit_merged",
    "refit_or_fix_batchnorm",
    "resolve_bn_mode",
    "resolve_device",
    "sample_warnings",
    "save_transforms",
    "score_data",
    "score_logits",
    "score_outputs",
    "select",
    "split_heldout",
    "state_of",
    "statistics_mode",
    "write_model",
]
