"""What a run carries through every step: progress callbacks, phase timings and the
warnings the report will list, gathered in one place (:class:`RunContext`)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


class Progress:
    """Progress callbacks; the CLI passes a rich implementation. Default: silent."""

    def start(self, task: str, total: int) -> None: ...

    def advance(self, n: int) -> None: ...

    def describe(self, text: str) -> None:
        """Replace the running task's description (e.g. with a score so far)."""

    def stop(self) -> None: ...


class Timer:
    """Seconds spent per named phase, summed over every time the phase is entered."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0


@dataclass
class RunContext:
    """One run's progress display, phase timer and warnings."""

    progress: Progress = field(default_factory=Progress)
    timer: Timer = field(default_factory=Timer)
    warnings: list[str] = field(default_factory=list)

    def warn(self, *messages: str) -> None:
        """Add ``messages`` (empty ones skipped) to the report's warnings."""
        self.warnings.extend(m for m in messages if m)
