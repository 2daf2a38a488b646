"""The ``ccamerge`` command line. Each command lives in its own module and
calls the library; results go to stdout, everything else to stderr.

Importing this package registers the commands without importing torch or the runs
(each command imports what it runs), so ``ccamerge --help`` and ``--version``
answer at once (tests/test_startup.py keeps it so).
"""

from __future__ import annotations

from . import (  # noqa: F401  (register commands)
    apply_cmd,
    archs_cmd,
    barrier_cmd,
    demo_cmd,
    eval_cmd,
    inspect_cmd,
    merge_cmd,
)
from .app import app


def main() -> None:
    app()
