from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from ..barrier import (
    PLOT_SUFFIXES,
    BarrierPlan,
    check_output_file,
    default_methods,
    plot_barrier,
    run_barrier,
    write_csv,
)
from ..pipeline import BN_MODES
from .app import app
from .common import BarProgress, console, handle_errors, print_json


@app.command("barrier")
@handle_errors
def barrier(
    checkpoint_a: Path = typer.Argument(..., readable=False, help="Model A (t = 0)."),
    checkpoint_b: Path = typer.Argument(..., readable=False, help="Model B (t = 1)."),
    eval_data: Path = typer.Option(
        ...,
        "--eval-data",
        readable=False,
        help="Labelled data on which loss and accuracy are measured.",
    ),
    data: Path | None = typer.Option(
        None,
        "--data",
        "-d",
        readable=False,
        help="Calibration data for alignment statistics and BatchNorm (needed by cca, permute).",
    ),
    methods: str | None = typer.Option(
        None,
        "--methods",
        "-m",
        help="Comma-separated methods; default average,permute,cca (those registered).",
    ),
    steps: int = typer.Option(
        11, "--steps", help="Points on [0, 1], ends included; odd puts t = 1/2 on the grid."
    ),
    plot: Path | None = typer.Option(
        None, "--plot", help=f"Write the curves as an image ({', '.join(PLOT_SUFFIXES)})."
    ),
    csv_path: Path | None = typer.Option(
        None, "--csv", help="Write one row per (method, t): method,t,loss,accuracy."
    ),
    gamma: float | None = typer.Option(
        None, "--gamma", help="CCA ridge (relative unless --ridge absolute). Default 0.1."
    ),
    ridge: str | None = typer.Option(
        None, "--ridge", help="CCA ridge kind: relative (default) or absolute."
    ),
    arch: str | None = typer.Option(
        None, "--arch", help="Architecture name (skip detection); see `ccamerge archs`."
    ),
    num_samples: int | None = typer.Option(
        None, "--num-samples", "-n", help="Use a seeded random subset of the calibration data."
    ),
    batch_size: int = typer.Option(256, "--batch-size", help="Batch size."),
    seed: int = typer.Option(0, "--seed", help="Seed for the calibration subset."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    reset_bn: bool = typer.Option(
        True, "--reset-bn/--no-reset-bn", help="Recompute BatchNorm statistics at each t."
    ),
    bn_mode: str = typer.Option(
        "auto", "--bn-mode", help=f"BatchNorm treatment at each t: {', '.join(BN_MODES)}."
    ),
    json_out: bool = typer.Option(
        False, "--json", help="Print curves and barriers as one JSON document on stdout."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No table or progress on stderr."),
) -> None:
    """Loss and accuracy along the interpolation path between two models, per method."""
    names = [m.strip() for m in methods.split(",") if m.strip()] if methods else default_methods()
    plot_path = check_output_file(plot, PLOT_SUFFIXES, "--plot") if plot else None
    csv_out = check_output_file(csv_path, (".csv",), "--csv") if csv_path else None
    params = {k: v for k, v in (("gamma", gamma), ("ridge", ridge)) if v is not None}
    plan = BarrierPlan(
        checkpoints=[str(checkpoint_a), str(checkpoint_b)],
        eval_data=str(eval_data),
        data=str(data) if data else None,
        methods=names,
        steps=steps,
        method_params=params,
        arch=arch,
        num_samples=num_samples,
        batch_size=batch_size,
        seed=seed,
        device=device,
        reset_bn=reset_bn,
        bn_mode=bn_mode,
    )
    report = run_barrier(plan, BarProgress(enabled=not (quiet or json_out)))
    if plot_path is not None:
        plot_barrier(report, plot_path)
    if csv_out is not None:
        write_csv(report, csv_out)
    if not quiet:
        render_barrier_report(report, plot_path, csv_out)
    if json_out:
        print_json(report)


def render_barrier_report(report: dict[str, Any], plot: Path | None, csv_out: Path | None) -> None:
    """The curve table (t by method) and the barrier summary, on stderr."""
    a, b = report["endpoints"]
    console.print(f"[bold]architecture[/] {report['architecture']['name']}")
    console.print(
        f"  A (t = 0): {a['path']}  accuracy {100 * a['accuracy']:.2f} %  loss {a['loss']:.4f}"
    )
    console.print(
        f"  B (t = 1): {b['path']}  accuracy {100 * b['accuracy']:.2f} %  loss {b['loss']:.4f}"
    )
    e = report["ensemble"]
    console.print(
        f"  ensemble of A and B (mean of logits): accuracy {100 * e['accuracy']:.2f} %  loss {e['loss']:.4f}"
    )
    names = list(report["curves"])
    curve = Table(
        title=f"Accuracy % / loss along the path ({report['eval_samples']} samples)",
        title_justify="left",
    )
    curve.add_column("t", justify="right")
    for name in names:
        curve.add_column(name, justify="right")
    for i, t in enumerate(report["t"]):
        row = [f"{t:.2f}"]
        for name in names:
            p = report["curves"][name][i]
            row.append(f"{100 * p['accuracy']:6.2f} / {p['loss']:.4f}")
        curve.add_row(*row)
    console.print(curve)

    summary = Table(title="Barriers (worst gap to the straight line, at t)", title_justify="left")
    for col in ("method", "loss", "accuracy pts", "acc. % at 1/2", "loss at 1/2"):
        summary.add_column(col, justify="left" if col == "method" else "right")
    for name in names:
        r = report["barriers"][name]
        summary.add_row(
            name,
            f"{r['loss']:.4f} @{r['loss_t']:.2f}",
            f"{100 * r['accuracy']:.2f} @{r['accuracy_t']:.2f}",
            "-" if r["accuracy_mid"] is None else f"{100 * r['accuracy_mid']:.2f}",
            "-" if r["loss_mid"] is None else f"{r['loss_mid']:.4f}",
        )
    console.print(summary)
    for name, done in report["batchnorm"].items():
        if not done.startswith("none"):
            console.print(f"[bold]BatchNorm[/] ({name}, 0 < t < 1): {done}")
    console.print("endpoints (t = 0, 1) are the checkpoints themselves, not re-merged")
    for w in report["warnings"]:
        console.print(f"[yellow]warning:[/] {w}")
    for what, path in (("plot", plot), ("curve CSV", csv_out)):
        if path is not None:
            console.print(f"[green]wrote[/] {what} {path}")
