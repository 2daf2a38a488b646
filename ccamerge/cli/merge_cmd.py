from __future__ import annotations

from pathlib import Path

import typer

from ..custom import parse_model_args
from ..merge import MergePlan, run_merge
from ..pipeline import BN_MODES
from ..report import render_merge_report
from .app import app
from .common import BarProgress, console, handle_errors, parse_floats, parse_gamma, print_json


@app.command("merge")
@handle_errors
def merge(
    checkpoints: list[Path] = typer.Argument(
        ...,
        readable=False,  # the library checks, with a one-line error (click's is a panel)
        help="Checkpoints (.safetensors, .pt, .pth, .bin); model 0 is the first.",
    ),
    data: Path | None = typer.Option(
        None,
        "--data",
        "-d",
        readable=False,
        help="Calibration data (.npz, .npy, .pt, .safetensors), model-ready inputs.",
    ),
    output: Path | None = typer.Option(
        None, "--output", "-o", help="Merged model, a .safetensors file."
    ),
    method: str = typer.Option(
        "cca",
        "--method",
        "-m",
        help="cca (default), permute, weight-matching, zipit or average; see docs/methods.md.",
    ),
    gamma: str | None = typer.Option(
        None,
        "--gamma",
        help="CCA ridge, a number or 'auto' (the default: chosen from 0.01..10 on held-out "
        "calibration data); relative to each layer's mean variance unless --ridge absolute.",
    ),
    select_by: str = typer.Option(
        "agreement",
        "--select-by",
        help="Criterion of --gamma auto / --method auto: agreement (with the ensemble, no "
        "labels needed) or loss (cross-entropy on held-out calibration labels).",
    ),
    ridge: str | None = typer.Option(
        None, "--ridge", help="CCA ridge kind: relative (default) or absolute."
    ),
    weights: str | None = typer.Option(
        None,
        "--weights",
        help="Merge weights, comma-separated (normalised to sum 1). Default uniform.",
    ),
    reference: str = typer.Option(
        "first",
        "--reference",
        help="Reference model: first, best (highest --eval-data accuracy, else lowest "
        "calibration loss) or an index.",
    ),
    alpha: float | None = typer.Option(
        None, "--alpha", help="zipit: repeated-matching discount in [0, 1]. Default 0.5."
    ),
    beta: float | None = typer.Option(
        None, "--beta", help="zipit: same-model merge budget in [0, 1]. Default 0."
    ),
    max_iter: int | None = typer.Option(
        None, "--max-iter", help="weight-matching: most sweeps over the groups. Default 100."
    ),
    save_transforms: Path | None = typer.Option(
        None,
        "--save-transforms",
        help="Also write every M_k and U_k to this .safetensors file (for `ccamerge apply`).",
    ),
    stats_mode: str = typer.Option(
        "auto",
        "--stats",
        help="Statistics: joint (all N models), pairwise (reference x model, less memory) or "
        "auto (pairwise when joint would not fit in half the available RAM).",
    ),
    eval_data: Path | None = typer.Option(
        None,
        "--eval-data",
        readable=False,
        help="Labelled data: report accuracy and loss of inputs, ensemble and merge.",
    ),
    arch: str | None = typer.Option(
        None, "--arch", help="Architecture name (skip detection); see `ccamerge archs`."
    ),
    model: str | None = typer.Option(
        None,
        "--model",
        help="Your own architecture: a factory 'pkg.module:fn' or 'path/file.py:fn' returning "
        "an nn.Module; feature groups are discovered by tracing. See docs/custom-models.md.",
    ),
    model_args: str | None = typer.Option(
        None, "--model-args", help="Keyword arguments of the --model factory, a JSON object."
    ),
    spec: Path | None = typer.Option(
        None, "--spec", help="Feature groups from a JSON spec file (see --spec-out)."
    ),
    spec_out: Path | None = typer.Option(
        None, "--spec-out", help="Write the feature groups used to a JSON spec file."
    ),
    num_samples: int | None = typer.Option(
        None,
        "--num-samples",
        "-n",
        help="Use a seeded random subset of this many calibration samples.",
    ),
    batch_size: int = typer.Option(256, "--batch-size", help="Calibration batch size."),
    seed: int = typer.Option(0, "--seed", help="Seed for the calibration subset."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    reset_bn: bool = typer.Option(
        True, "--reset-bn/--no-reset-bn", help="Recompute BatchNorm statistics after merging."
    ),
    bn_mode: str = typer.Option(
        "auto",
        "--bn-mode",
        help=f"BatchNorm treatment: {', '.join(BN_MODES)}. auto: renorm for dense transforms, vector for permutations.",
    ),
    force: bool = typer.Option(False, "--force", "-f", help="Overwrite an existing output file."),
    json_out: bool = typer.Option(
        False, "--json", help="Print the report as one JSON document on stdout."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No report or progress on stderr."),
) -> None:
    """Merge two or more checkpoints of one architecture into one model."""
    given = {
        "gamma": parse_gamma(gamma),
        "ridge": ridge,
        "alpha": alpha,
        "beta": beta,
        "max_iter": max_iter,
    }
    params = {k: v for k, v in given.items() if v is not None}
    plan = MergePlan(
        checkpoints=[str(c) for c in checkpoints],
        output=str(output) if output else None,
        data=str(data) if data else None,
        eval_data=str(eval_data) if eval_data else None,
        arch=arch,
        model=model,
        model_args=parse_model_args(model_args),
        spec=str(spec) if spec else None,
        spec_out=str(spec_out) if spec_out else None,
        method=method,
        method_params=params,
        weights=parse_floats(weights, "--weights"),
        reference=reference,
        num_samples=num_samples,
        batch_size=batch_size,
        seed=seed,
        device=device,
        reset_bn=reset_bn,
        bn_mode=bn_mode,
        force=force,
        save_transforms=str(save_transforms) if save_transforms else None,
        stats_mode=stats_mode,
        select_by=select_by,
    )
    result = run_merge(plan, BarProgress(enabled=not (quiet or json_out)))
    if not quiet:
        render_merge_report(result.report, console)
    if json_out:
        print_json(result.report)
