"""Helpers every built-in architecture entry uses."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ..registry import NotThisArchitecture


def check_fits(
    state_dict: Mapping[str, torch.Tensor],
    build: Callable[[Mapping[str, Any]], nn.Module],
    config: Mapping[str, Any],
    score: float,
) -> None:
    """Raise NotThisArchitecture unless ``build(config)`` has the checkpoint's tensors.

    Same names and shapes; the model is built on the ``meta`` device, so this
    allocates nothing. ``num_batches_tracked`` may be missing from the
    checkpoint (old PyTorch versions did not save it; BatchNorm's loader fills
    it in). Shared by the built-in entries.
    """
    with torch.device("meta"):
        model = build(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for k in state_dict:
        if k not in expected:
            raise NotThisArchitecture(f"unexpected tensor {k!r}", score)
        if tuple(state_dict[k].shape) != expected[k]:
            raise NotThisArchitecture(
                f"{k} has shape {tuple(state_dict[k].shape)}, expected {expected[k]}", score
            )
    for k in expected:
        if k not in state_dict and not k.endswith("num_batches_tracked"):
            raise NotThisArchitecture(f"tensor {k!r} is missing", score)
