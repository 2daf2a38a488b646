"""The memory policy: keep every chunk's live values between layers ("stored") when
they fit in the budget, else recompute them per layer ("recompute")."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ...runtime import distributed
from ...runtime.errors import RefitError
from ..stats import available_memory
from .interpret import Run
from .plan import Plan

# the driver


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    return 0


def _peak_bytes(plan: Plan, model: nn.Module, x: torch.Tensor) -> int:
    """The most bytes of live values while ``model`` runs on ``x``."""
    run, peak = Run(plan, model, x), 0
    for i in range(len(plan.nodes)):
        run.run_to(i + 1)
        peak = max(peak, sum(_nbytes(v) for v in run.env.values()))
    return peak


def first_and_count(batches: Callable[[], Iterable[torch.Tensor]]) -> tuple[torch.Tensor, int]:
    """The first calibration chunk and the number of samples in all of them."""
    first, samples = None, 0
    for x in batches():
        first = x if first is None else first
        samples += x.shape[0]
    if first is None or samples == 0:
        raise RefitError("no calibration samples")
    return first, samples


def choose_mode(
    plan: Plan,
    merged: nn.Module,
    first: torch.Tensor,
    samples: int,
    runs: int,
    budget: int | None,
    device: torch.device,
) -> str:
    """ "stored" when the live values of this rank's share of the ``samples`` for the
    ``runs`` networks run on every chunk fit in ``budget`` bytes (None: no limit known), else "recompute". Under
    distribution every rank decides "recompute" when one of them must."""
    stored = True
    if budget is not None:
        per_sample = _peak_bytes(plan, merged, first.to(device)) / first.shape[0]
        share = math.ceil(samples / distributed.world_size())
        stored = per_sample * share * runs <= budget
    must_recompute = torch.tensor([0.0 if stored else 1.0], dtype=torch.float64)
    distributed.all_reduce_sum([must_recompute])
    return "stored" if float(must_recompute) == 0 else "recompute"


def default_memory_budget(device: torch.device) -> int | None:
    """Half the memory free now where the stored activations would live: the GPU's for
    a CUDA device, else the RAM (None: unknown)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free // 2
    available = available_memory()
    return None if available is None else available // 2
