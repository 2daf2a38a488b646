from __future__ import annotations

from pathlib import Path

import typer

from ..runtime.interrupts import quiet_interrupt_on_command_line
from .app import command
from .common import BarProgress, handle_errors, print_json, stderr_console
from .options import (
    Activation,
    Arch,
    BatchSize,
    BnMode,
    ConfigFile,
    Data,
    Device,
    Force,
    Gamma,
    Json,
    NumSamples,
    Params,
    Quiet,
    ResetBn,
    Ridge,
    Seed,
    Verbose,
)
from .params import method_params


@command("barrier")
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
    data: Data = None,
    methods: str | None = typer.Option(
        None,
        "--methods",
        "-m",
        help="Comma-separated methods; default average,permute,cca (those registered).",
    ),
    steps: int = typer.Option(
        11, "--steps", help="Points on [0, 1], ends included; odd puts t = 1/2 on the grid."
    ),
    plot: Path | None = typer.Option(None, "--plot"),  # help: options.LATE_HELP
    csv_path: Path | None = typer.Option(
        None, "--csv", help="Write one row per (method, t): method,t,loss,accuracy."
    ),
    param: Params = None,
    gamma: Gamma = None,
    ridge: Ridge = None,
    arch: Arch = None,
    activation: Activation = None,
    num_samples: NumSamples = None,
    batch_size: BatchSize = 256,
    seed: Seed = 0,
    device: Device = "cpu",
    reset_bn: ResetBn = True,
    bn_mode: BnMode = "auto",
    json_out: Json = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
    force: Force = False,
    config: ConfigFile = None,
) -> None:
    """Loss and accuracy along the interpolation path between two models, per method."""
    with quiet_interrupt_on_command_line():  # Ctrl-C while torch loads: one line
        from ..io.files import check_outputs
        from ..runs.barrier import (
            PLOT_SUFFIXES,
            BarrierPlan,
            default_methods,
            plot_barrier,
            run_barrier,
            write_csv,
        )
        from ..runs.report import render_barrier_report
    names = [m.strip() for m in methods.split(",") if m.strip()] if methods else default_methods()
    inputs = [p for p in (checkpoint_a, checkpoint_b, eval_data, data) if p is not None]
    outputs = [("--plot", plot, PLOT_SUFFIXES), ("--csv", csv_path, (".csv",))]
    plot_path, csv_out = check_outputs(outputs, inputs, force)
    aliases = {"--gamma": gamma, "--ridge": ridge}
    params = method_params(names, param, aliases, config and config.params)
    plan = BarrierPlan.from_options(
        [checkpoint_a, checkpoint_b],
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
        activation=activation,
    )
    report = run_barrier(plan, BarProgress(enabled=not (quiet or json_out)))
    check_outputs(outputs, inputs, force)  # again: minutes passed
    if plot_path is not None:
        plot_barrier(report, plot_path)
    if csv_out is not None:
        write_csv(report, csv_out)
    if not quiet:
        render_barrier_report(report, plot_path, csv_out, stderr_console(), verbose)
    if json_out:
        print_json(report)
