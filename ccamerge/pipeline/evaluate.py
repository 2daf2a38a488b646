"""Accuracy and cross-entropy of models, their ensemble and the merge.

A classifier is scored on the labels ``y``. A language model, whose forward gives
(batch, length, vocabulary) logits, is scored on unlabelled token ids (``input_ids``
without ``y``) as next-token prediction: every position but the last is a row whose
label is the next token (padded positions, and predictions of one, left out); its scores
add the perplexity ``exp(loss)``. The check, the ensemble and the selection read the same
rows."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..io.files import Dataset
from ..io.padding import next_token_pairs
from ..models.outputs import logits_of
from ..runtime.distributed import shard, unshard
from ..runtime.errors import DataError, OptionError
from .load import LoadedModels


@dataclass(frozen=True)
class Score:
    accuracy: float
    loss: float
    perplexity: float | None = None  # next-token prediction: exp(loss)

    def to_dict(self) -> dict[str, float]:
        out = {"accuracy": self.accuracy, "loss": self.loss}
        return out if self.perplexity is None else {**out, "perplexity": self.perplexity}


def next_token(data: Dataset) -> bool:
    """Whether ``data`` is scored as next-token prediction: token ids without labels."""
    return data.tokens and data.y is None


def labels_of(data: Dataset) -> torch.Tensor | None:
    """The label of every row: ``y``, or the next token of every position but the last
    (of a real token followed by a real token, when the data is padded)."""
    if not next_token(data):
        return data.y
    return data.x[:, 1:][next_token_pairs(data.x)]


@torch.no_grad()
def predict_logits(
    model: nn.Module, data: Dataset, batch_size: int = 512, device="cpu"
) -> torch.Tensor:
    """Logits of every row (float32, CPU): one a sample, or for a language model on token
    ids without labels one a position but the last. Under distribution each rank runs
    its share of the batches and every rank gets all outputs, in order."""
    model.eval()
    outs = []
    for x in shard(data.batches(batch_size)):
        out = logits_of(model(x.to(device))).float().cpu()
        if out.ndim == 3 and next_token(data):  # (batch, length, vocabulary)
            out = out[:, :-1][next_token_pairs(x)]
        outs.append(out)
    return torch.cat(unshard(outs))


def check_labels(data: Dataset, num_classes: int) -> None:
    """One-line errors for evaluation data without labels, or with labels (next tokens)
    outside the model's ``num_classes`` outputs."""
    y = labels_of(data)
    if y is None:
        raise DataError(f"evaluation data {data.path} has no labels 'y'")
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= num_classes:
        what = "token ids" if next_token(data) else "labels"
        raise DataError(
            f"evaluation data {data.path}: {what} range over [{lo}, {hi}] "
            f"but the model has {num_classes} outputs"
        )


def score_logits(logits: torch.Tensor, y: torch.Tensor, next_token: bool = False) -> Score:
    """Accuracy and mean cross-entropy of ``logits`` on labels ``y``; with ``next_token``,
    the perplexity too."""
    loss = float(F.cross_entropy(logits.double(), y))
    return Score(
        accuracy=float((logits.argmax(1) == y).float().mean()),
        loss=loss,
        perplexity=math.exp(min(loss, 700.0)) if next_token else None,
    )


def score_data(logits: torch.Tensor, data: Dataset) -> Score:
    """:func:`score_logits` on ``data``'s rows (:func:`labels_of`)."""
    y = labels_of(data)
    if y is None or y.shape[0] != logits.shape[0]:
        raise DataError(
            f"evaluation data {data.path} has no labels 'y' (token ids without labels are "
            "scored as next tokens, which needs (batch, length, vocabulary) logits)"
        )
    return score_logits(logits, y, next_token(data))


def ensemble_logits(logits: Sequence[torch.Tensor], weights: Sequence[float] | None = None):
    """The logit-averaging ensemble: mean (or weighted mean) of the models' logits."""
    w = weights or [1.0 / len(logits)] * len(logits)
    return sum(wk * lk for wk, lk in zip(w, logits))


def evaluate(model: nn.Module, data: Dataset, batch_size: int = 512, device="cpu") -> Score:
    logits = predict_logits(model, data, batch_size, device)
    check_labels(data, logits.shape[1])
    return score_data(logits, data)


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
            {"path": p, **score_data(lg, data).to_dict()} for p, lg in zip(loaded.paths, logits)
        ],
        "ensemble": {
            "kind": "mean of logits",
            **score_data(ensemble_logits(logits), data).to_dict(),
        },
        "num_samples": len(data),
    }
    if next_token(data):
        evaluation["predicted_tokens"] = logits[0].shape[0]
    if merged_model is not None:
        merged = predict_logits(merged_model, data, batch_size, device)
        evaluation["merged"] = score_data(merged, data).to_dict()
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
    elif calib is not None and labels_of(calib) is not None:
        data, by = calib, "cross-entropy on the calibration data"
    else:
        raise OptionError(
            "--reference best needs labelled data: --eval-data, or calibration data with labels 'y'"
        )
    scores = []
    for sd in loaded.state_dicts:
        logits = predict_logits(loaded.build(sd, device), data, batch_size, device)
        check_labels(data, logits.shape[1])
        scores.append(score_data(logits, data))
    if eval_data is not None:
        best = max(range(len(scores)), key=lambda k: (scores[k].accuracy, -scores[k].loss, -k))
    else:
        best = min(range(len(scores)), key=lambda k: (scores[k].loss, k))
    return best, {"rule": "best", "by": by, "scores": [sc.to_dict() for sc in scores]}
