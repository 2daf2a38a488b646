"""Signals that stop a run: Ctrl-C (SIGINT), SIGTERM (``timeout``, batch schedulers,
container stops) and SIGHUP (a closed terminal).

Each becomes an exception that unwinds the run, so every ``finally`` and the atomic
writer's cleanup run (no temporary file is left), and the command line exits with
the conventional code 128 + signal number (130, 143, 129). This module imports only
the standard library: the package's ``__init__`` uses it before torch loads.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

INTERRUPTED = "interrupted; nothing was written"
STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)
)


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived; a BaseException like KeyboardInterrupt, so that only
    code that cleans up and re-raises sees it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated(signum)


@contextmanager
def stop_signals_raise() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise :class:`Terminated` (main thread only;
    the previous handlers come back afterwards)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _raise_terminated) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextmanager
def quiet_interrupt_on_command_line() -> Iterator[None]:
    """Within the block (the seconds torch takes to import), Ctrl-C ends the ``ccamerge``
    command at once with one line and exit code 130 instead of an import traceback.
    Nothing has been written yet, and a KeyboardInterrupt raised inside a half-imported
    library can be caught and turned into another error there, so the handler exits
    directly. In any other program (the library imported) nothing changes."""
    command = os.path.basename(sys.argv[0] if sys.argv else "") == "ccamerge"
    if not command or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, _exit_interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _exit_interrupted(signum: int, frame: object) -> None:
    sys.stderr.write(f"error: {INTERRUPTED}\n")
    sys.stderr.flush()
    os._exit(128 + signum)
