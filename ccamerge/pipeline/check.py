"""An unlabelled check of a merge: is it closer to the ensemble than every input model?

On held-out inputs the merge was not fitted on (e.g. :func:`.select.split_heldout`'s
held-out part of the calibration data), the merged model and each input model are
compared with the inputs' logit-averaging ensemble (:func:`.evaluate.ensemble_logits`,
with the merge weights) as :func:`.select.score_outputs` scores a candidate: top-1
agreement with the ensemble and the mean KL divergence KL(p_ensemble || p_model) of
the softmax outputs (temperature 1). An input *beats* the merge when its KL is lower
than the merge's by more than ``tolerance``: then one of the inputs, unmerged, is a
better stand-in for the ensemble than the merge. No labels are needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .evaluate import ensemble_logits, predict_logits
from .load import Calibration, LoadedModels
from .select import score_outputs

KL_TOLERANCE = 1e-6  # nats: below this, a difference in KL is round-off, not a better model


@dataclass(frozen=True)
class Agreement:
    """One model against the ensemble on the held-out inputs."""

    name: str
    agreement: float  # top-1 agreement with the ensemble
    kl: float  # mean KL(p_ensemble || p_model)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "top1_agreement": self.agreement, "kl": self.kl}


@dataclass(frozen=True)
class MergeCheck:
    merged: Agreement
    inputs: tuple[Agreement, ...]
    num_samples: int
    tolerance: float = KL_TOLERANCE

    @property
    def beaten_by(self) -> list[str]:
        """The inputs whose KL to the ensemble is lower than the merge's (beyond ``tolerance``)."""
        return [m.name for m in self.inputs if m.kl < self.merged.kl - self.tolerance]

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_samples": self.num_samples,
            "merged": self.merged.to_dict(),
            "inputs": [m.to_dict() for m in self.inputs],
            "beaten_by": self.beaten_by,
            "tolerance": self.tolerance,
        }


def check_outputs(
    merged: torch.Tensor,
    inputs: Sequence[torch.Tensor],
    names: Sequence[str],
    weights: Sequence[float],
    tolerance: float = KL_TOLERANCE,
) -> MergeCheck:
    """The check from held-out logits: the merge's and each input model's."""
    ensemble = ensemble_logits(list(inputs), list(weights))

    def against_ensemble(name: str, logits: torch.Tensor) -> Agreement:
        _, kl, agreement, _ = score_outputs(logits, ensemble, None, "agreement")
        return Agreement(name, agreement, kl)

    return MergeCheck(
        against_ensemble("merged", merged),
        tuple(against_ensemble(n, lg) for n, lg in zip(names, inputs, strict=True)),
        merged.shape[0],
        tolerance,
    )


def check_merge(
    loaded: LoadedModels,
    merged_model: nn.Module,
    heldout: Calibration,
    weights: Sequence[float],
    tolerance: float = KL_TOLERANCE,
) -> MergeCheck:
    """The check of ``merged_model`` against ``loaded``'s models (named by their paths) on
    ``heldout`` (its labels, if any, are not used). Under distribution each rank runs its
    share of the batches and every rank gets the same result."""
    data, batch_size, device = heldout.data, heldout.batch_size, heldout.device
    inputs = [
        predict_logits(loaded.build(sd, device), data, batch_size, device)
        for sd in loaded.state_dicts
    ]
    merged = predict_logits(merged_model, data, batch_size, device)
    return check_outputs(merged, inputs, loaded.paths, weights, tolerance)
