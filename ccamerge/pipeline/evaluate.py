"""Accuracy and cross-entropy of models, their ensemble and the merge."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..io.files import Dataset
from ..models.outputs import logits_of
from ..runtime.distributed import shard, unshard
from ..runtime.errors import DataError, OptionError
from .load import LoadedModels


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
    """Outputs on every sample (float32, CPU). Under distribution each rank runs its share
    of the batches and every rank gets all outputs, in order."""
    model.eval()
    outs = [logits_of(model(x.to(device))).float().cpu() for x in shard(data.batches(batch_size))]
    return torch.cat(unshard(outs))


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


def evaluate_all(
    loaded: LoadedModels,
    merged_model: nn.Module | None,
    data: Dataset,
    batch_size: int,
    device: str,
) -> dict[str, Any]:
    """Scores of the input models, their logit-averaging ensemble and (if given) the merge."""
    logits = [
        predict_logits(loaded.build(sd, device), data, batch_size, device)
        for sd in loaded.state_dicts
    ]
    check_labels(data, logits[0].shape[1])
    evaluation = {
        "models": [
            {"path": p, **score_logits(lg, data.y).to_dict()} for p, lg in zip(loaded.paths, logits)
        ],
        "ensemble": {
            "kind": "mean of logits",
            **score_logits(ensemble_logits(logits), data.y).to_dict(),
        },
        "num_samples": len(data),
    }
    if merged_model is not None:
        merged = predict_logits(merged_model, data, batch_size, device)
        evaluation["merged"] = score_logits(merged, data.y).to_dict()
    return evaluation


def choose_best_reference(
    loaded: LoadedModels,
    eval_data: Dataset | None,
    calib: Dataset | None,
    batch_size: int,
    device: str,
) -> tuple[int, dict[str, Any]]:
    """The model with the highest accuracy on ``eval_data`` (ties: lower loss), or without
    it the lowest cross-entropy on the labelled calibration data."""
    if eval_data is not None:
        data, by = eval_data, "accuracy on the evaluation data"
    elif calib is not None and calib.y is not None:
        data, by = calib, "cross-entropy on the calibration data"
    else:
        raise OptionError(
            "--reference best needs labelled data: --eval-data, or calibration data with labels 'y'"
        )
    scores = []
    for sd in loaded.state_dicts:
        logits = predict_logits(loaded.build(sd, device), data, batch_size, device)
        check_labels(data, logits.shape[1])
        scores.append(score_logits(logits, data.y))
    if eval_data is not None:
        best = max(range(len(scores)), key=lambda k: (scores[k].accuracy, -scores[k].loss, -k))
    else:
        best = min(range(len(scores)), key=lambda k: (scores[k].loss, k))
    return best, {"rule": "best", "by": by, "scores": [sc.to_dict() for sc in scores]}
