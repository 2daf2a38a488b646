from __future__ import annotations

from pathlib import Path

import typer

from ..runtime.interrupts import quiet_interrupt_on_command_line
from .app import command
from .common import BarProgress, handle_errors, parse_floats, print_json, stderr_console
from .options import (
    BatchSize,
    BnMode,
    ConfigFile,
    Data,
    Device,
    DistillData,
    EvalData,
    Force,
    Json,
    NumSamples,
    Output,
    Quiet,
    Refit,
    RefitMaxRows,
    RefitRidge,
    ResetBn,
    Seed,
    Verbose,
    Weights,
)


@command("apply")
@handle_errors
def apply(
    checkpoints: list[Path] = typer.Argument(
        ...,
        readable=False,
        help="The checkpoints the transforms were computed for, in the same order.",
    ),
    transforms: Path = typer.Option(
        ...,
        "--transforms",
        "-t",
        readable=False,
        help="Transforms file written by `ccamerge merge --save-transforms`.",
    ),
    output: Output = None,
    weights: Weights = None,
    data: Data = None,
    eval_data: EvalData = None,
    num_samples: NumSamples = None,
    seed: Seed = None,
    batch_size: BatchSize = None,
    device: Device = "cpu",
    reset_bn: ResetBn = True,
    bn_mode: BnMode = None,
    refit: Refit = None,
    refit_ridge: RefitRidge = None,
    refit_max_rows: RefitMaxRows = None,
    distill_data: DistillData = None,
    force: Force = False,
    json_out: Json = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
    config: ConfigFile = None,  # its callback fills the defaults above from the file
) -> None:
    """Merge checkpoints again with saved transforms: no alignment statistics needed."""
    with quiet_interrupt_on_command_line():  # Ctrl-C while torch loads: one line
        from ..runs.apply import ApplyPlan, run_apply
        from ..runs.report import render_merge_report
    plan = ApplyPlan(
        transforms=str(transforms),
        checkpoints=[str(c) for c in checkpoints],
        output=output,
        weights=parse_floats(weights, "--weights"),
        data=str(data) if data else None,
        eval_data=str(eval_data) if eval_data else None,
        num_samples=num_samples,
        seed=seed,
        batch_size=batch_size,
        device=device,
        reset_bn=reset_bn,
        bn_mode=bn_mode,
        force=force,
        refit=refit,
        refit_ridge=refit_ridge,
        refit_max_rows=refit_max_rows,
        distill_data=str(distill_data) if distill_data else None,
    )
    result = run_apply(plan, BarProgress(enabled=not (quiet or json_out)))
    if not quiet:
        render_merge_report(result.report, stderr_console(), verbose)
    if json_out:
        print_json(result.report)
