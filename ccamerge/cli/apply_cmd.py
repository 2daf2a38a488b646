from __future__ import annotations

from pathlib import Path

import typer

from ..apply import ApplyPlan, run_apply
from ..pipeline import BN_MODES
from ..report import render_merge_report
from .app import app
from .common import BarProgress, console, handle_errors, parse_floats, print_json


@app.command("apply")
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
    output: Path | None = typer.Option(
        None, "--output", "-o", help="Merged model, a .safetensors file."
    ),
    weights: str | None = typer.Option(
        None,
        "--weights",
        help="Merge weights, comma-separated (normalised). Default: those of the saved merge.",
    ),
    data: Path | None = typer.Option(
        None,
        "--data",
        "-d",
        readable=False,
        help="Calibration data for the BatchNorm reset (not needed otherwise).",
    ),
    eval_data: Path | None = typer.Option(
        None,
        "--eval-data",
        readable=False,
        help="Labelled data: report accuracy and loss of inputs and merge.",
    ),
    num_samples: int | None = typer.Option(
        None,
        "--num-samples",
        "-n",
        help="Use a seeded random subset of the calibration data. Default: as in the merge.",
    ),
    seed: int | None = typer.Option(
        None, "--seed", help="Seed for the calibration subset. Default: as in the merge."
    ),
    batch_size: int | None = typer.Option(
        None, "--batch-size", help="Batch size for the BatchNorm reset. Default: as in the merge."
    ),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    reset_bn: bool = typer.Option(
        True, "--reset-bn/--no-reset-bn", help="Recompute BatchNorm statistics after merging."
    ),
    bn_mode: str | None = typer.Option(
        None,
        "--bn-mode",
        help=f"BatchNorm treatment: {', '.join(m for m in BN_MODES if m != 'auto')}. "
        "Default: the saved merge's.",
    ),
    force: bool = typer.Option(False, "--force", "-f", help="Overwrite an existing output file."),
    json_out: bool = typer.Option(
        False, "--json", help="Print the report as one JSON document on stdout."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No report or progress on stderr."),
) -> None:
    """Merge checkpoints again with saved transforms: no alignment statistics needed."""
    plan = ApplyPlan(
        transforms=str(transforms),
        checkpoints=[str(c) for c in checkpoints],
        output=str(output) if output else None,
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
    )
    result = run_apply(plan, BarProgress(enabled=not (quiet or json_out)))
    if not quiet:
        render_merge_report(result.report, console)
    if json_out:
        print_json(result.report)
