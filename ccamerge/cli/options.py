"""Every option that more than one command takes, declared once: one type, one meaning.

A command gives the default (``batch_size: BatchSize = 256``); ``apply`` defaults some
of them to None, meaning "as recorded in the transforms file".

An option whose help reads the method registry or the pipeline (which import torch)
declares none; :data:`LATE_HELP` holds it, filled in when a help page is shown
(:func:`fill_late_help`), so that registering the commands stays fast.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import typer

from .config import read_config
from .params import alias_help, method_help, param_help

# readable=False: the library checks files, with a one-line error (click's is a panel)
Data = Annotated[
    Path | None,
    typer.Option(
        "--data",
        "-d",
        readable=False,
        help="Calibration data (.npz, .npy, .pt, .safetensors), model-ready inputs; - reads "
        "standard input.",
    ),
]
EvalData = Annotated[
    Path | None,
    typer.Option(
        "--eval-data",
        readable=False,
        help="Labelled data: report accuracy and loss of the inputs, their ensemble and the merge.",
    ),
]
Output = Annotated[
    str | None,
    typer.Option(
        "--output",
        "-o",
        help="Merged model: .safetensors (with provenance metadata), .pt/.pth/.bin (a plain "
        "state dict), DIR/ (a Hugging Face-style folder: model.safetensors, sharded when "
        "large, and the first input's config.json), or - (merge only) for safetensors on "
        "standard output.",
    ),
]
Arch = Annotated[
    str | None,
    typer.Option("--arch", help="Architecture name (skip detection); see `ccamerge archs`."),
]
Model = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="Your own architecture: a factory 'pkg.module:fn' or 'path/file.py:fn' returning "
        "an nn.Module; feature groups are discovered by tracing. See docs/custom-models.md.",
    ),
]
Activation = Annotated[
    str | None,
    typer.Option(
        "--activation",
        help="An MLP's activation (relu, tanh, gelu, sigmoid, silu, elu, leaky_relu); a "
        "checkpoint does not record it. Default: relu, assumed, said in the report and "
        "checked on labelled data.",
    ),
]
ModelArgs = Annotated[
    str | None,
    typer.Option("--model-args", help="Keyword arguments of the --model factory, a JSON object."),
]
SpecOut = Annotated[
    Path | None,
    typer.Option("--spec-out", help="Write the feature groups used to a JSON spec file."),
]
Weights = Annotated[
    str | None,
    typer.Option("--weights", help="Merge weights, comma-separated (normalised to sum 1)."),
]
Params = Annotated[list[str] | None, typer.Option("--param", "-p", metavar="KEY=VALUE")]
Gamma = Annotated[str | None, typer.Option("--gamma", metavar="NUMBER|auto")]
Ridge = Annotated[str | None, typer.Option("--ridge")]
Alpha = Annotated[str | None, typer.Option("--alpha", metavar="NUMBER")]
Beta = Annotated[str | None, typer.Option("--beta", metavar="NUMBER")]
MaxIter = Annotated[str | None, typer.Option("--max-iter", metavar="N")]
# the value a command receives is the file's ccamerge.cli.config.Config (its method
# parameters), or None; the callback has already filled the other options' defaults
ConfigFile = Annotated[
    Path | None,
    typer.Option(
        "--config",
        is_eager=True,
        callback=read_config,
        readable=False,
        help="Settings from a .toml (or .yaml/.yml) file: the flags' names as keys, e.g. "
        "num-samples = 500, method parameters in a \\[params] table; flags given on the "
        "command line win (docs/cli.md).",
    ),
]
NumSamples = Annotated[
    int | None,
    typer.Option("--num-samples", "-n", help="Use a seeded random subset of the calibration data."),
]
BatchSize = Annotated[
    int | None, typer.Option("--batch-size", help="Batch size of forward passes.")
]
Seed = Annotated[int | None, typer.Option("--seed", help="Seed for the calibration subset.")]
Device = Annotated[str, typer.Option("--device", help="cpu or cuda.")]
ResetBn = Annotated[
    bool,
    typer.Option("--reset-bn/--no-reset-bn", help="Recompute BatchNorm statistics after merging."),
]
BnMode = Annotated[str | None, typer.Option("--bn-mode")]
Force = Annotated[
    bool, typer.Option("--force", "-f", help="Overwrite existing output files (never an input).")
]
Json = Annotated[
    bool, typer.Option("--json", help="Print the result as one JSON document on stdout.")
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No report or progress on stderr.")]
MEMBERS_SHOWN = 4  # member tensors of a group that inspect lists without --verbose
Verbose = Annotated[
    bool,
    typer.Option(
        "--verbose",
        "-v",
        help="List every warning in the report; without it, more than 3 of one kind (one "
        "per layer, say) are one line with their count and first names. --json lists all.",
    ),
]
Refit = Annotated[
    bool | None,
    typer.Option(
        "--refit/--no-refit",
        help="Refit the merge layer by layer to the models' mapped outputs on the calibration "
        "data (docs/refit.md); --no-refit: the paper's CCA Merge with BatchNorm reset/REPAIR.",
    ),
]
# the default is the pipeline's (None here: said in the help)
RefitRidge = Annotated[float | None, typer.Option("--refit-ridge")]
RefitMaxRows = Annotated[int | None, typer.Option("--refit-max-rows")]


def _bn_mode_help() -> str:
    from ..pipeline import BN_MODES

    return (
        f"BatchNorm treatment: {', '.join(BN_MODES)}. auto: renorm for dense transforms, "
        "vector for permutations."
    )


def _refit_ridge_help() -> str:
    from ..pipeline import DEFAULT_RIDGE

    return (
        "Ridge of the refit towards the averaged weights, relative to each layer's mean "
        f"input energy. Default {DEFAULT_RIDGE:g}."
    )


def _refit_max_rows_help() -> str:
    from ..pipeline import DEFAULT_MAX_ROWS

    return (
        "Rows (samples x output positions) one layer's refit uses at most; 0: all. "
        f"Default {DEFAULT_MAX_ROWS}."
    )


def _plot_help() -> str:
    from ..runs.barrier import PLOT_SUFFIXES

    return f"Write the curves as an image ({', '.join(PLOT_SUFFIXES)})."


# flag -> its help, computed when a help page shows it (barrier's --plot and merge's
# --method are one command's, but their help reads a run and the registry too)
Distill = Annotated[
    str | None,
    typer.Option(
        "--distill",
        metavar="EPOCHS|auto",
        help="After the refit, train the merge end to end against the inputs' mean logits: a "
        "number of epochs, or auto (while the agreement on the held-out samples improves; "
        "docs/distill.md). Off by default.",
    ),
]
DistillData = Annotated[
    Path | None,
    typer.Option(
        "--distill-data",
        readable=False,
        help="Unlabelled inputs to distil on instead of the calibration samples: a data file "
        "(.npy is memory-mapped, any size) or a folder of data files, read in turn.",
    ),
]
Augment = Annotated[
    str | None,
    typer.Option(
        "--augment",
        metavar="flip,crop",
        help="Image augmentations while distilling (off by default: a flip is not valid for "
        "every kind of image).",
    ),
]
Check = Annotated[
    bool,
    typer.Option(
        "--check/--no-check",
        help="Hold out a part of the calibration samples and compare the merge and each input "
        "with the inputs' ensemble there (no labels needed); --no-check fits on all of them.",
    ),
]
CheckFraction = Annotated[
    float | None,
    typer.Option("--check-fraction"),  # help: LATE_HELP
]


def _check_fraction_help() -> str:
    from ..pipeline import CHECK_FRACTION

    return (
        "Fraction of the calibration samples the check holds out (at least 64 samples). "
        f"Default {CHECK_FRACTION:g}."
    )


SelectBy = Annotated[
    str,
    typer.Option(
        "--select-by",
        help="Criterion of --gamma auto / --method auto: agreement (with the ensemble, no "
        "labels needed) or loss (cross-entropy on held-out calibration labels).",
    ),
]
Reference = Annotated[
    str,
    typer.Option(
        "--reference",
        help="Reference model: first, best (highest --eval-data accuracy, else lowest "
        "calibration loss) or an index.",
    ),
]
SaveTransforms = Annotated[
    Path | None,
    typer.Option(
        "--save-transforms",
        help="Also write every M_k and U_k to this .safetensors file (for `ccamerge apply`).",
    ),
]
StatsMode = Annotated[
    str,
    typer.Option(
        "--stats",
        help="Statistics: joint (all N models), pairwise (reference x model, less memory) or "
        "auto (pairwise when joint would not fit in half the available RAM).",
    ),
]
SpecFile = Annotated[
    Path | None,
    typer.Option("--spec", help="Feature groups from a JSON spec file (see --spec-out)."),
]


LATE_HELP: dict[str, Callable[[], str]] = {
    "--method": method_help,
    "--param": param_help,
    "--gamma": partial(alias_help, "--gamma", "cca"),
    "--ridge": partial(alias_help, "--ridge", "cca"),
    "--alpha": partial(alias_help, "--alpha", "zipit"),
    "--beta": partial(alias_help, "--beta", "zipit"),
    "--max-iter": partial(alias_help, "--max-iter", "weight-matching"),
    "--bn-mode": _bn_mode_help,
    "--refit-ridge": _refit_ridge_help,
    "--refit-max-rows": _refit_max_rows_help,
    "--check-fraction": _check_fraction_help,
    "--plot": _plot_help,
}


def fill_late_help(params: Iterable[Any]) -> None:
    """Give each of a command's click parameters that :data:`LATE_HELP` names its help."""
    for param in params:
        late = [LATE_HELP[flag] for flag in getattr(param, "opts", ()) if flag in LATE_HELP]
        if late:
            param.help = late[0]()
