"""Small helpers shared by the benchmark scripts."""

from __future__ import annotations

import os

import torch


def blas_env(threads: int) -> dict[str, str]:
    """The environment for a worker subprocess run with ``threads`` torch threads.

    ``ccamerge.stats`` forms Gram products through numpy, whose BLAS (OpenBLAS)
    sizes its own thread pool from these variables when numpy is imported; without
    them a one-thread torch measurement would get extra BLAS threads for free."""
    env = dict(os.environ)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    return env


def top1(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of ``logits`` (n, classes) against labels ``y``."""
    return float((logits.argmax(1) == y).float().mean())
