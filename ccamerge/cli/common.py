"""What every command shares: the stderr console, error mapping, progress, JSON output.

Exit codes: 0 success; 1 a user error (bad file, bad data, bad option value);
2 a usage error reported by the argument parser; 3 an internal error (a bug:
rerun with ``--debug`` for the traceback); 130 interrupted (Ctrl-C); 143 and 129
terminated by SIGTERM and SIGHUP (cleaned up like Ctrl-C).

Under torchrun (:mod:`ccamerge.runtime.distributed`) only rank 0 prints: the console
and the JSON document are silent on the other ranks, and of the ranks that
fail only the first prints its error line.
"""

from __future__ import annotations

import functools
import math
import os
import sys
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar

import typer

from ..runtime.context import Progress
from ..runtime.errors import CcaMergeError, OptionError
from ..runtime.interrupts import INTERRUPTED, Terminated, stop_signals_raise

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress as RichProgress

# rich, torch and the runs load inside the commands that use them: ``ccamerge --help``
# and ``--version`` start without them (tests/test_startup.py)


def _distributed() -> ModuleType | None:
    """:mod:`ccamerge.runtime.distributed` once a command has imported it, else None. Only
    that module joins torchrun's process group, so before it is imported there is none:
    this process answers as rank 0, as it would before ``distributed.setup``."""
    return sys.modules.get("ccamerge.runtime.distributed")


def is_main() -> bool:
    """True on rank 0 and in a run of one process: the one that prints."""
    distributed = _distributed()
    return distributed is None or distributed.is_main()


class _MainRankStderr:
    """stderr on rank 0 (and in a run of one process); silent on the other ranks."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text) if is_main() else len(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


# piped, a console never wraps or cuts a line (paths stay whole; grep sees each line)
PIPED_WIDTH = 10_000


def stderr_console() -> Console:
    """The console of reports, warnings and progress: stderr (whatever ``sys.stderr`` is
    at each write), silent on ranks other than 0; as wide as its lines when piped."""
    return _stderr_console(terminal=sys.stderr.isatty())


@functools.cache
def _stderr_console(terminal: bool) -> Console:
    from rich.console import Console

    width = None if terminal else PIPED_WIDTH
    return Console(file=_MainRankStderr(), highlight=False, width=width)


EXIT_USER_ERROR = 1
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130

_state = {"debug": bool(os.environ.get("CCAMERGE_DEBUG"))}

F = TypeVar("F", bound=Callable[..., Any])


def set_debug(on: bool) -> None:
    _state["debug"] = on or bool(os.environ.get("CCAMERGE_DEBUG"))


def product_console(to_stderr: bool = False) -> Console:
    """Where a command whose product is information (archs, inspect, eval) prints it:
    stdout, so that it pipes (rich styles it only on a terminal; piped, it is plain
    text); stderr when stdout carries ``--json``. Silent on ranks other than 0."""
    if to_stderr:
        return stderr_console()
    from rich.console import Console

    piped = not sys.stdout.isatty()
    return Console(
        file=sys.stdout,
        highlight=False,
        soft_wrap=True,
        width=PIPED_WIDTH if piped else None,
        quiet=not is_main(),
    )


def error_line(message: str) -> None:
    """One line on stderr, no markup interpretation, never wrapped."""
    print(f"error: {message}", file=sys.stderr, flush=True)


def handle_errors(fn: F) -> F:
    """Map library errors to one line and exit 1; Ctrl-C to 130, SIGTERM and SIGHUP to
    128 + the signal number; bugs to exit 3. Under torchrun only the first rank to fail
    prints (:func:`fail`)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with stop_signals_raise():
                result = fn(*args, **kwargs)
        except typer.Exit:
            raise
        except CcaMergeError as e:
            if _state["debug"]:
                raise
            fail(str(e), EXIT_USER_ERROR)
        except KeyboardInterrupt:
            if _state["debug"]:
                raise
            fail(INTERRUPTED, EXIT_INTERRUPTED)
        except Terminated as e:  # SIGTERM, SIGHUP: cleaned up like Ctrl-C
            if _state["debug"]:
                raise
            fail(f"terminated by {e}; nothing was written", e.exit_code)
        except MemoryError:
            if _state["debug"]:
                raise
            fail(
                "out of memory; try a smaller --batch-size or fewer --num-samples", EXIT_USER_ERROR
            )
        except Exception as e:  # a bug: say so in one line, traceback with --debug
            if _state["debug"]:
                raise
            fail(
                f"internal error ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                "rerun with --debug (or CCAMERGE_DEBUG=1) for the traceback and report it",
                EXIT_INTERNAL,
            )
        _shutdown()
        return result

    return wrapper  # type: ignore[return-value]


def fail(message: str, code: int) -> None:
    """Print ``message`` as the error line and exit with ``code``; under torchrun, a rank
    that another rank's failure ended exits silently with that rank's code."""
    distributed = _distributed()
    first = None if distributed is None else distributed.claim_failure(code)
    if first is None:
        error_line(message)
    _shutdown()
    raise typer.Exit(code if first is None else first) from None


def _shutdown() -> None:
    """Leave torchrun's process group, if one was joined."""
    distributed = _distributed()
    if distributed is not None:
        distributed.shutdown()


def print_json(document: Any) -> None:
    """The one JSON document a command writes on stdout (on rank 0 only): strict JSON,
    null where a number is undefined (NaN or infinite)."""
    from ..io.files import json_text

    if not is_main():
        return
    sys.stdout.write(json_text(document, indent=2) + "\n")
    sys.stdout.flush()


class BarProgress(Progress):
    """A rich progress bar on stderr (a :class:`ccamerge.runtime.context.Progress`); silent when
    stderr is not a terminal or quiet."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and stderr_console().is_terminal
        self._bar: RichProgress | None = None
        self._task: Any = None

    def start(self, task: str, total: int) -> None:
        if not self.enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as RichProgress

        self._bar = RichProgress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=stderr_console(),
            transient=True,
        )
        self._bar.start()
        self._task = self._bar.add_task(task, total=total)

    def advance(self, n: int) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, n)

    def describe(self, text: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, description=text)

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def parse_floats(text: str | None, option: str) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = [math.nan]
    if not all(math.isfinite(v) for v in values):
        raise OptionError(f"{option} expects comma-separated finite numbers, got {text!r}")
    return values
