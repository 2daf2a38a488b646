from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from ..custom import parse_input_shape, parse_model_args
from ..inspection import inspect_checkpoint
from .app import app
from .common import console, handle_errors, print_json


@app.command("inspect")
@handle_errors
def inspect(
    checkpoint: Path = typer.Argument(
        ..., readable=False, help="A checkpoint (.safetensors, .pt, .pth, .bin)."
    ),
    arch: str | None = typer.Option(
        None, "--arch", help="Architecture name (skip detection); see `ccamerge archs`."
    ),
    model: str | None = typer.Option(
        None,
        "--model",
        help="Your own architecture: a factory 'pkg.module:fn' or 'path/file.py:fn'; "
        "its feature groups are discovered. See docs/custom-models.md.",
    ),
    model_args: str | None = typer.Option(
        None, "--model-args", help="Keyword arguments of the --model factory, a JSON object."
    ),
    input_shape: str | None = typer.Option(
        None,
        "--input-shape",
        help="One sample's shape for discovery, e.g. 3,32,32 (inferred when the input "
        "feeds a Linear layer).",
    ),
    spec_out: Path | None = typer.Option(
        None, "--spec-out", help="Write the feature groups to a JSON spec file (for --spec)."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the description as JSON on stdout."),
) -> None:
    """Show what ccamerge detects in a checkpoint: architecture, size, feature groups."""
    info = inspect_checkpoint(
        str(checkpoint),
        arch,
        model,
        parse_model_args(model_args),
        parse_input_shape(input_shape),
        str(spec_out) if spec_out else None,
    )
    if json_out:
        print_json(info)
        return
    render_inspection(info)


def render_inspection(info: dict[str, Any]) -> None:
    arch = info["architecture"]
    cfg = ", ".join(f"{k}={v}" for k, v in arch["config"].items())
    console.print(f"[bold]{info['path']}[/]")
    console.print(f"[bold]architecture[/] {arch['name']} ({cfg})")
    shape = info["input_shape"]
    console.print(
        f"[bold]input[/] {'-' if shape is None else ' x '.join(map(str, shape))} per sample"
    )
    console.print(
        f"[bold]parameters[/] {info['num_parameters']:,}  (+ {info['num_buffer_values']:,} "
        f"buffer values, {info['num_tensors']} tensors)"
    )
    t = Table(title=f"Feature groups ({len(info['groups'])})", title_justify="left")
    t.add_column("group")
    t.add_column("size", justify="right")
    t.add_column("collected at")
    t.add_column("members (tensor:axis)")
    for g in info["groups"]:
        members = " ".join(f"{m['tensor']}:{m['axis']}" for m in g["members"])
        t.add_row(g["name"], str(g["size"]), f"{g['collect_on']} of {g['collect_at']}", members)
    console.print(t)
    if info["ungrouped"]:
        console.print(f"[bold]not transformed[/] (only averaged): {', '.join(info['ungrouped'])}")
    for u in info.get("untransformed", []):
        why = "; ".join(u["reasons"])
        console.print(f"[bold]untransformed units[/] of {', '.join(u['writers'])}: {why}")
    for w in info.get("warnings", []):
        console.print(f"[yellow]warning:[/] {w}")
