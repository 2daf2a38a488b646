"""The ``ccamerge`` typer application and its root options; every command registers on it
with :func:`command`.

Registering a command imports neither torch nor the runs: a command imports what it
runs inside its function, and the options whose help reads the registries get it when
a help page is shown (:data:`ccamerge.cli.options.LATE_HELP`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import typer
from typer.core import TyperCommand

from ..runtime.interrupts import quiet_interrupt_on_command_line
from ..version import __version__
from .common import set_debug
from .options import fill_late_help

app = typer.Typer(
    name="ccamerge",
    help="Merge neural networks of one architecture with CCA Merge and its baselines.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


class Command(TyperCommand):
    """A command whose help page fills in the help that reads the registries first."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        with quiet_interrupt_on_command_line():  # the registries import torch
            fill_late_help(self.params)
        super().format_help(ctx, formatter)


def command(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``@command("merge")``: register a function as the command ``name``."""
    return app.command(name, cls=Command)


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
