"""The ``ccamerge`` command line. Each command lives in its own module and
calls the library; results go to stdout, everything else to stderr.

Importing this package registers the commands without importing torch or the runs
(each command imports what it runs), so ``ccamerge --help`` and ``--version``
answer at once (tests/test_startup.py keeps it so).
"""

from __future__ import annotations

import sys

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
    """Run the command line; a torchrun worker exits through
    :func:`ccamerge.runtime.distributed.exit_worker` (no interpreter teardown)."""
    try:
        app()
    except SystemExit as e:
        distributed = sys.modules.get("ccamerge.runtime.distributed")
        if distributed is None or not distributed.launched():
            raise
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        distributed.exit_worker(code)
