from __future__ import annotations

from pathlib import Path

import typer

from ..runtime.interrupts import quiet_interrupt_on_command_line
from .app import command
from .common import BarProgress, handle_errors, print_json, stderr_console
from .options import Force, Json


@command("demo")
@handle_errors
def demo(
    out_dir: Path = typer.Option(
        Path("ccamerge-demo"), "--out-dir", help="Folder for checkpoints, data and merged models."
    ),
    n_models: int = typer.Option(
        3, "--models", min=2, max=10, help="How many MLPs to train and merge."
    ),
    force: Force = False,
    json_out: Json = False,
) -> None:
    """Train small MLPs on the bundled digits data, merge them (average vs CCA), compare."""
    with quiet_interrupt_on_command_line():  # Ctrl-C while torch loads: one line
        from ..runs.demo import demo_files, prepare_folder, run_demo
        from ..runs.report import evaluation_table, print_table
    console = stderr_console()
    prepare_folder(out_dir, demo_files(n_models), force)  # before saying it trains
    console.print(f"training {n_models} MLPs 64-128-128-10 on digits (different seeds) ...")
    res = run_demo(
        out_dir, n_models=n_models, progress=BarProgress(enabled=not json_out), force=force
    )
    table = evaluation_table(
        res["evaluation"], title="Test accuracy on digits", merged_label="CCA Merge + refit"
    )
    print_table(table, console)
    console.print(f"merged model (CCA): {res['output']}")
    console.print(f"done in {res['total_seconds']:.1f} s. Try it by hand:")
    console.print(f"  {res['merge_command']}", soft_wrap=True)
    if json_out:
        print_json(res)
