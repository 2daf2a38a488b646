from __future__ import annotations

from pathlib import Path

import typer

from ..runtime.errors import remedies
from ..runtime.interrupts import quiet_interrupt_on_command_line
from .app import command
from .common import handle_errors, print_json, product_console, stderr_console
from .options import Activation, Arch, BatchSize, Device, Json


@command("eval")
@handle_errors
def eval_(
    checkpoints: list[Path] = typer.Argument(
        ..., readable=False, help="Checkpoints of one architecture (.safetensors, .pt, .pth, .bin)."
    ),
    data: Path = typer.Option(..., "--data", "-d", readable=False, help="Labelled data (x and y)."),
    ensemble: bool = typer.Option(
        False, "--ensemble", help="Also score the ensemble (mean of the models' logits)."
    ),
    arch: Arch = None,
    activation: Activation = None,
    batch_size: BatchSize = 512,
    device: Device = "cpu",
    json_out: Json = False,
) -> None:
    """Loss and accuracy of each checkpoint (and of their logit-averaging ensemble)."""
    with quiet_interrupt_on_command_line():  # Ctrl-C while torch loads: one line
        from ..io.files import check_stdin_once
        from ..models.assumptions import check_settings, describe
        from ..pipeline import (
            ModelSource,
            check_batch_size,
            evaluate_all,
            load_models,
            read_eval_data,
            resolve_device,
        )
        from ..runs.remedies import REMEDIES
        from ..runs.report import (
            evaluation_table,
            print_table,
            render_assumptions,
            render_warnings,
        )
    named = [(f"checkpoint {k}", c) for k, c in enumerate(checkpoints)]
    check_stdin_once([*named, ("--data", data)])
    device = resolve_device(device)
    check_batch_size(batch_size)
    source = ModelSource(arch=arch, activation=activation)
    stated = source.stated
    with remedies(**REMEDIES["eval"]):
        loaded = load_models([str(c) for c in checkpoints], source)
    dataset = read_eval_data(str(data), loaded)
    evaluation = evaluate_all(loaded, None, dataset, batch_size, device)
    if not ensemble:
        del evaluation["ensemble"]
    evaluation["architecture"] = loaded.detected.name
    evaluation["assumptions"] = describe(loaded.detected, stated)
    evaluation["warnings"] = loaded.warnings + check_settings(
        loaded, dataset, stated, batch_size, device
    )
    table = evaluation_table(evaluation, title=f"Evaluation on {data}")
    print_table(table, product_console(to_stderr=json_out))
    render_assumptions(evaluation, stderr_console())
    render_warnings(evaluation["warnings"], stderr_console())
    if json_out:
        print_json(evaluation)
