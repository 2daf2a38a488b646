from __future__ import annotations

from pathlib import Path

import typer

from ..runtime.interrupts import quiet_interrupt_on_command_line
from .app import command
from .common import handle_errors, print_json, product_console
from .options import MEMBERS_SHOWN, Activation, Arch, Force, Json, Model, ModelArgs, SpecOut


@command("inspect")
@handle_errors
def inspect(
    checkpoint: Path = typer.Argument(
        ..., readable=False, help="A checkpoint (.safetensors, .pt, .pth, .bin)."
    ),
    arch: Arch = None,
    activation: Activation = None,
    model: Model = None,
    model_args: ModelArgs = None,
    input_shape: str | None = typer.Option(
        None,
        "--input-shape",
        help="One sample's shape for discovery, e.g. 3,32,32 (inferred when the input "
        "feeds a Linear layer).",
    ),
    spec_out: SpecOut = None,
    force: Force = False,
    json_out: Json = False,
    verbose: bool = typer.Option(
        False,
        "--verbose",
        "-v",
        help="List every member tensor of each feature group (without it: the first "
        f"{MEMBERS_SHOWN} and a count; --json lists all).",
    ),
) -> None:
    """Show what ccamerge detects in a checkpoint: architecture, size, feature groups."""
    with quiet_interrupt_on_command_line():  # Ctrl-C while torch loads: one line
        from ..models.custom import parse_input_shape, parse_model_args
        from ..pipeline import ModelSource
        from ..runs.inspection import inspect_checkpoint
        from ..runs.report import render_inspection
    source = ModelSource(arch, model, parse_model_args(model_args), activation=activation)
    info = inspect_checkpoint(
        str(checkpoint),
        source,
        parse_input_shape(input_shape),
        str(spec_out) if spec_out else None,
        force,
    )
    if json_out:
        print_json(info)
        return
    render_inspection(info, product_console(), verbose, MEMBERS_SHOWN)
