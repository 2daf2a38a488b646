from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from ..inspect import inspect_checkpoint
from . import app
from .common import console, handle_errors, print_json


@app.command("inspect")
@handle_errors
def inspect(
    checkpoint: Path = typer.Argument(..., help="A checkpoint (.safetensors, .pt, .pth, .bin)."),
    arch: str | None = typer.Option(
        None, "--arch", help="Architecture name (skip detection); see `ccamerge archs`."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the description as JSON on stdout."),
) -> None:
    """Show what ccamerge detects in a checkpoint: architecture, size, feature groups."""
    info = inspect_checkpoint(str(checkpoint), arch)
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
