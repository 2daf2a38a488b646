"""The ``ccamerge`` typer application and its root options; every command registers on it."""

from __future__ import annotations

import typer

from ..version import __version__
from .common import set_debug

app = typer.Typer(
    name="ccamerge",
    help="Merge neural networks of one architecture with CCA Merge and its baselines.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        print(f"ccamerge {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(
        False, "--debug", help="Show tracebacks instead of one-line errors (or CCAMERGE_DEBUG=1)."
    ),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    set_debug(debug)
