from __future__ import annotations

from pathlib import Path

import typer

from ..pipeline import (
    check_batch_size,
    evaluate_all,
    load_models,
    read_eval_data,
    resolve_device,
)
from ..report import evaluation_table
from .app import app
from .common import console, handle_errors, print_json
from .options import Arch, BatchSize, Device, Json


@app.command("eval")
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
    batch_size: BatchSize = 512,
    device: Device = "cpu",
    json_out: Json = False,
) -> None:
    """Loss and accuracy of each checkpoint (and of their logit-averaging ensemble)."""
    device = resolve_device(device)
    check_batch_size(batch_size)
    loaded = load_models([str(c) for c in checkpoints], arch)
    dataset = read_eval_data(str(data), loaded)
    evaluation = evaluate_all(loaded, None, dataset, batch_size, device)
    if not ensemble:
        del evaluation["ensemble"]
    evaluation["architecture"] = loaded.detected.name
    console.print(evaluation_table(evaluation, title=f"Evaluation on {data}"))
    if json_out:
        print_json(evaluation)
