from __future__ import annotations

from pathlib import Path

import typer

from ..errors import OptionError
from ..files import load_data
from ..pipeline import check_data_fits, evaluate_all, load_models, resolve_device
from ..report import evaluation_table
from .app import app
from .common import console, handle_errors, print_json


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
    arch: str | None = typer.Option(
        None, "--arch", help="Architecture name (skip detection); see `ccamerge archs`."
    ),
    batch_size: int = typer.Option(512, "--batch-size", help="Evaluation batch size."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    json_out: bool = typer.Option(False, "--json", help="Print the scores as JSON on stdout."),
) -> None:
    """Loss and accuracy of each checkpoint (and of their logit-averaging ensemble)."""
    device = resolve_device(device)
    if batch_size <= 0:
        raise OptionError(f"--batch-size must be positive, got {batch_size}")
    loaded = load_models([str(c) for c in checkpoints], arch)
    dataset = load_data(data, require_labels=True)
    check_data_fits(dataset, loaded, "evaluation data")
    evaluation = evaluate_all(loaded, None, dataset, batch_size, device)
    if not ensemble:
        del evaluation["ensemble"]
    evaluation["architecture"] = loaded.detected.name
    console.print(evaluation_table(evaluation, title=f"Evaluation on {data}"))
    if json_out:
        print_json(evaluation)
