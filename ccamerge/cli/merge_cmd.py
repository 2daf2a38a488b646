from __future__ import annotations

from pathlib import Path

import typer

from ..runtime.errors import OptionError
from ..runtime.interrupts import quiet_interrupt_on_command_line
from .app import command
from .common import BarProgress, handle_errors, parse_floats, print_json, stderr_console
from .options import (
    Activation,
    Alpha,
    Arch,
    Augment,
    BatchSize,
    Beta,
    BnMode,
    Check,
    CheckFraction,
    ConfigFile,
    Data,
    Device,
    Distill,
    DistillData,
    EvalData,
    Force,
    Gamma,
    Json,
    MaxIter,
    Model,
    ModelArgs,
    NumSamples,
    Output,
    Params,
    Quiet,
    Reference,
    Refit,
    RefitMaxRows,
    RefitRidge,
    ResetBn,
    Ridge,
    SaveTransforms,
    Seed,
    SelectBy,
    SpecFile,
    SpecOut,
    StatsMode,
    Verbose,
    Weights,
)
from .params import method_params, methods_of


@command("merge")
@handle_errors
def merge(
    checkpoints: list[Path] = typer.Argument(
        ...,
        readable=False,  # the library checks, with a one-line error (click's is a panel)
        help="Checkpoints (.safetensors, .pt, .pth, .bin); model 0 is the first.",
    ),
    data: Data = None,
    output: Output = None,
    method: str = typer.Option("cca", "--method", "-m"),  # help: options.LATE_HELP
    gamma: Gamma = None,
    select_by: SelectBy = "agreement",
    ridge: Ridge = None,
    weights: Weights = None,
    reference: Reference = "first",
    param: Params = None,
    alpha: Alpha = None,
    beta: Beta = None,
    max_iter: MaxIter = None,
    save_transforms: SaveTransforms = None,
    stats_mode: StatsMode = "auto",
    eval_data: EvalData = None,
    arch: Arch = None,
    model: Model = None,
    model_args: ModelArgs = None,
    activation: Activation = None,
    spec: SpecFile = None,
    spec_out: SpecOut = None,
    num_samples: NumSamples = None,
    batch_size: BatchSize = 256,
    seed: Seed = 0,
    device: Device = "cpu",
    reset_bn: ResetBn = True,
    bn_mode: BnMode = "auto",
    refit: Refit = True,
    refit_ridge: RefitRidge = None,
    refit_max_rows: RefitMaxRows = None,
    distill: Distill = None,
    distill_data: DistillData = None,
    augment: Augment = None,
    check: Check = True,
    check_fraction: CheckFraction = None,
    force: Force = False,
    json_out: Json = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
    config: ConfigFile = None,
) -> None:
    """Merge two or more checkpoints of one architecture into one model."""
    with quiet_interrupt_on_command_line():  # Ctrl-C while torch loads: one line
        from ..io.files import STREAM, check_stdout, safetensors_file, write_stdout
        from ..models.custom import parse_model_args
        from ..pipeline import (
            CHECK_FRACTION,
            DEFAULT_MAX_ROWS,
            DEFAULT_RIDGE,
            parse_augment,
            parse_epochs,
            provenance,
        )
        from ..runs.merge import MergePlan, run_merge
        from ..runs.report import render_merge_report
    to_stdout = output is not None and str(output) == STREAM
    if to_stdout:
        if json_out:
            raise OptionError(
                "-o - writes the merged model on standard output; --json cannot share it "
                "(the report goes to stderr)"
            )
        check_stdout()
    aliases = {"--gamma": gamma, "--ridge": ridge, "--alpha": alpha, "--beta": beta}
    aliases["--max-iter"] = max_iter
    params = method_params(methods_of(method), param, aliases, config and config.params)
    plan = MergePlan.from_options(
        checkpoints,
        output=output if output and not to_stdout else None,
        data=str(data) if data else None,
        eval_data=str(eval_data) if eval_data else None,
        arch=arch,
        model=model,
        model_args=parse_model_args(model_args),
        activation=activation,
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
        refit=bool(refit),
        refit_ridge=float(DEFAULT_RIDGE if refit_ridge is None else refit_ridge),
        refit_max_rows=int(DEFAULT_MAX_ROWS if refit_max_rows is None else refit_max_rows),
        distill=parse_epochs(distill),
        distill_data=str(distill_data) if distill_data else None,
        augment=parse_augment(augment),
        check=check,
        check_fraction=CHECK_FRACTION if check_fraction is None else check_fraction,
    )
    result = run_merge(plan, BarProgress(enabled=not (quiet or json_out)))
    if to_stdout:
        result.report["output"] = STREAM
        metadata = provenance(result.report, plan.data)
        write_stdout(safetensors_file(result.state_dict, metadata, "output -"))
    if not quiet:
        render_merge_report(result.report, stderr_console(), verbose)
    if json_out:
        print_json(result.report)
