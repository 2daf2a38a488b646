"""What a model's forward returns, read as logits.

A forward may return the logits themselves, a tuple or list whose first item they are
(auxiliary outputs after them), a dict with a ``"logits"`` entry, or an output object
with a ``logits`` attribute (Hugging Face's ``ModelOutput``, a dict too). Every step that
reads a model's outputs (evaluation, the check, the ensemble, distillation) reads them
through :func:`logits_of`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..runtime.errors import ArchitectureError


def logits_of(output: Any) -> torch.Tensor:
    """The logits in a forward's ``output``; a one-line error when there are none."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        found = output.get("logits")
    elif isinstance(output, (tuple, list)):
        found = output[0] if output else None
    else:
        found = getattr(output, "logits", None)
    if isinstance(found, torch.Tensor):
        return found
    raise ArchitectureError(
        f"the model's forward returns {type(output).__name__}, with no logits in it: ccamerge "
        "reads a tensor, the first item of a tuple or list, or a 'logits' entry or attribute"
    )
