"""Accuracy and cross-entropy of models, their ensemble and the merge."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import DataError
from .io import Dataset


@dataclass(frozen=True)
class Score:
    accuracy: float
    loss: float

    def to_dict(self) -> dict[str, float]:
        return {"accuracy": self.accuracy, "loss": self.loss}


@torch.no_grad()
def predict_logits(
    model: nn.Module, data: Dataset, batch_size: int = 512, device="cpu"
) -> torch.Tensor:
    model.eval()
    outs = [model(x.to(device)).float().cpu() for x in data.batches(batch_size)]
    return torch.cat(outs)


def check_labels(data: Dataset, num_classes: int) -> None:
    if data.y is None:
        raise DataError(f"evaluation data {data.path} has no labels 'y'")
    lo, hi = int(data.y.min()), int(data.y.max())
    if lo < 0 or hi >= num_classes:
        raise DataError(
            f"evaluation data {data.path}: labels range over [{lo}, {hi}] "
            f"but the model has {num_classes} outputs"
        )


def score_logits(logits: torch.Tensor, y: torch.Tensor) -> Score:
    return Score(
        accuracy=float((logits.argmax(1) == y).float().mean()),
        loss=float(F.cross_entropy(logits.double(), y)),
    )


def ensemble_logits(logits: Sequence[torch.Tensor], weights: Sequence[float] | None = None):
    """The logit-averaging ensemble: mean (or weighted mean) of the models' logits."""
    w = weights or [1.0 / len(logits)] * len(logits)
    return sum(wk * lk for wk, lk in zip(w, logits))


def evaluate(model: nn.Module, data: Dataset, batch_size: int = 512, device="cpu") -> Score:
    logits = predict_logits(model, data, batch_size, device)
    check_labels(data, logits.shape[1])
    return score_logits(logits, data.y)
