"""Small helpers shared by the benchmark scripts."""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

import torch


def blas_env(threads: int) -> dict[str, str]:
    """The environment for a worker subprocess run with ``threads`` torch threads.

    ``ccamerge.maths.stats`` forms Gram products through numpy, whose BLAS (OpenBLAS)
    sizes its own thread pool from these variables when numpy is imported; without
    them a one-thread torch measurement would get extra BLAS threads for free."""
    env = dict(os.environ)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    return env


def run_worker(cmd: list[str], threads: int, what: str, tail: int = 3000) -> dict[str, Any] | None:
    """Run a benchmark worker subprocess (with :func:`blas_env`) and return the JSON it
    prints after ``RESULT ``; print ``FAILED what`` with its stderr's end and return None
    when it fails."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=blas_env(threads))
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        print(f"FAILED {what}:\n{proc.stderr[-tail:]}", flush=True)
        return None
    return json.loads(line[len("RESULT ") :])


def top1(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of ``logits`` (n, classes) against labels ``y``."""
    return float((logits.argmax(1) == y).float().mean())
