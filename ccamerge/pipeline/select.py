"""Choosing the regularisation and the method per run, without labels.

The calibration data is split (seeded) into a part that feeds the statistics
and BatchNorm reset, and a held-out part that only scores candidates. Every
candidate (a method with its parameters) is aligned from the same statistics,
merged, and run on the held-out part; the score is

* ``agreement`` (default, needs no labels): the mean KL divergence
  KL(p_ensemble || p_merged) between the softmax outputs of the models'
  logit-averaging ensemble and of the merged model (lower is better); the
  top-1 agreement is reported beside it;
* ``loss``: the cross-entropy on the held-out labels (lower is better).

Cost per candidate: one alignment (from the stored statistics), one tensor
merge, a BatchNorm reset pass where the network has BatchNorm, and one
forward pass over the held-out part; the ensemble's outputs are computed once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..maths.stats import Statistics
from ..methods import Alignment, MergeMethod
from ..runtime.errors import DataError, OptionError
from .align import align_models, label
from .assemble import MergeRecipe, build_merged
from .evaluate import ensemble_logits, labels_of, predict_logits
from .load import Calibration, LoadedModels

SELECT_BY = ("agreement", "loss")
MIN_HELDOUT = 64  # samples in each part of the split


@dataclass
class Split:
    """``stats`` feeds the statistics and BN reset; ``heldout`` only scores."""

    stats: Calibration
    heldout: Calibration
    stats_index: torch.Tensor
    heldout_index: torch.Tensor


def split_heldout(
    calib: Calibration, fraction: float = 0.2, seed: int = 0, minimum: int = MIN_HELDOUT
) -> Split:
    """A seeded random split; the held-out part has ``max(minimum, fraction * n)`` samples."""
    data = calib.data
    n = len(data)
    n_held = max(minimum, int(round(fraction * n)))
    if n - n_held < minimum:
        raise DataError(
            f"automatic selection needs at least {2 * minimum} calibration samples "
            f"(a held-out part and a statistics part), got {n}"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919))
    held, rest = order[:n_held].sort().values, order[n_held:].sort().values

    def take(idx: torch.Tensor) -> Calibration:
        return calib.with_data(data.take(idx))

    return Split(take(rest), take(held), rest, held)


@dataclass
class Scored:
    method: MergeMethod
    alignment: Alignment
    score: float
    kl: float
    agreement: float
    loss: float | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "candidate": label(self.method),
            "method": self.method.name,
            "params": self.method.params(),
            "score": self.score,
            "kl": self.kl,
            "top1_agreement": self.agreement,
            "loss": self.loss,
        }


def score_outputs(
    merged: torch.Tensor, ensemble: torch.Tensor, y: torch.Tensor | None, select_by: str
) -> tuple[float, float, float, float | None]:
    """``(score, kl, top1 agreement, loss)`` of merged logits against the ensemble's."""
    log_p = F.log_softmax(ensemble.double(), 1)
    log_q = F.log_softmax(merged.double(), 1)
    kl = float((log_p.exp() * (log_p - log_q)).sum(1).mean())
    agree = float((merged.argmax(1) == ensemble.argmax(1)).double().mean())
    loss = None if y is None else float(F.cross_entropy(merged.double(), y))
    if select_by == "loss":
        if loss is None:
            raise DataError("--select-by loss needs labels 'y' in the calibration data")
        return loss, kl, agree, loss
    return kl, kl, agree, loss


def select(
    loaded: LoadedModels,
    stats: Statistics | None,
    candidates: Sequence[MergeMethod],
    split: Split,
    recipe: MergeRecipe,
    select_by: str = "agreement",
) -> tuple[Scored, list[Scored], dict[str, torch.Tensor], torch.nn.Module, str]:
    """Score every candidate, merged by ``recipe`` with its alignment, on the held-out
    part; returns the winner, all scores (in candidate order) and the winner's merged state
    dict, model and BN note."""
    if select_by not in SELECT_BY:
        raise OptionError(f"--select-by must be one of {', '.join(SELECT_BY)}")
    held = split.heldout
    batch_size, device = held.batch_size, held.device
    ens = ensemble_logits(
        [
            predict_logits(loaded.build(sd, device), held.data, batch_size, device)
            for sd in loaded.state_dicts
        ],
        list(recipe.weights),
    )
    scored: list[Scored] = []
    best: tuple[float, int, Any] | None = None
    for method in candidates:
        alignment = align_models(method, loaded, recipe.reference, stats)
        merge = recipe.aligned(alignment, method)
        state, model, bn_done = build_merged(loaded, merge, split.stats, stats)
        logits = predict_logits(model, held.data, batch_size, device)
        labels = labels_of(held.data)  # none for token ids a classifier reads
        labels = labels if labels is not None and labels.shape[0] == logits.shape[0] else None
        s, kl, agree, loss = score_outputs(logits, ens, labels, select_by)
        scored.append(Scored(method, alignment, s, kl, agree, loss))
        if best is None or s < best[0]:
            best = (s, len(scored) - 1, (state, model, bn_done))
    assert best is not None
    state, model, bn_done = best[2]
    return scored[best[1]], scored, state, model, bn_done
