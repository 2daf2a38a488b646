"""An unlabelled check of a merge: is it closer to the ensemble than every input model?

On held-out inputs the merge was not fitted on (e.g. :func:`.select.split_heldout`'s
held-out part of the calibration data), the merged model and each input model are
compared with the inputs' logit-averaging ensemble (:func:`.evaluate.ensemble_logits`,
with the merge weights) as :func:`.select.score_outputs` scores a candidate: top-1
agreement with the ensemble and the mean KL divergence KL(p_ensemble || p_model) of
the softmax outputs (temperature 1). An input *beats* the merge when it agrees with the
ensemble on more held-out samples: then one of the inputs, unmerged, is a better
stand-in for the ensemble than the merge. Each input's difference from the merge comes
with its paired standard error (the rows where only one of the two agrees decide it);
the warning says when the difference is within two of them, i.e. may be noise.
Agreement decides because it is what tracked test accuracy across models of different
kinds in the benchmarks (docs/distill.md); KL does not rank a merge against its inputs
reliably (an input can be closer in KL and still agree less), and is reported beside
it. No labels are needed.

Every merge with calibration data runs the check (:class:`CheckSettings`): a seeded
``fraction`` of the calibration samples is held out of the statistics, the refit and
any BatchNorm reset (:func:`hold_out`), or, when ``--gamma auto``/``--method auto``
holds out a part for selection, that part serves the check too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..runtime.errors import OptionError
from .evaluate import ensemble_logits, next_token, predict_logits
from .load import Calibration, LoadedModels
from .select import MIN_HELDOUT, Split, score_outputs, split_heldout

CHECK_FRACTION = 0.1  # of the calibration samples, held out for the check by default


@dataclass(frozen=True)
class CheckSettings:
    """Whether the check runs, and the fraction of the calibration samples it holds out
    (at least :data:`MIN_HELDOUT` samples)."""

    enabled: bool = True
    fraction: float = CHECK_FRACTION

    def check(self) -> CheckSettings:
        if not (isinstance(self.fraction, (int, float)) and 0 < self.fraction < 1):
            raise OptionError(f"--check-fraction must lie in (0, 1), got {self.fraction!r}")
        return self


def hold_out(calib: Calibration, settings: CheckSettings, seed: int) -> Split | str:
    """The seeded split that keeps the check's samples out of the merge, or why there is
    none (too few samples for both parts)."""
    if len(calib) < 2 * MIN_HELDOUT:
        return (
            f"the check needs at least {2 * MIN_HELDOUT} calibration samples "
            f"({MIN_HELDOUT} held out), got {len(calib)}; the merge was not checked"
        )
    return split_heldout(calib, settings.fraction, seed)


@dataclass(frozen=True)
class Agreement:
    """One model against the ensemble on the held-out inputs; for an input model, the
    paired standard error of its agreement minus the merge's (``paired_se``)."""

    name: str
    agreement: float  # top-1 agreement with the ensemble
    kl: float  # mean KL(p_ensemble || p_model)
    paired_se: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {"name": self.name, "top1_agreement": self.agreement, "kl": self.kl}
        return out if self.paired_se is None else {**out, "paired_se": self.paired_se}


@dataclass(frozen=True)
class MergeCheck:
    merged: Agreement
    inputs: tuple[Agreement, ...]
    num_samples: int  # rows compared: samples, or a language model's next tokens
    unit: str = "samples"  # what a row is: "samples" or "next tokens"

    @property
    def beaten_by(self) -> list[str]:
        """The inputs that agree with the ensemble on more samples than the merge."""
        return [m.name for m in self.inputs if m.agreement > self.merged.agreement]

    def warning(self, distilled: bool = False) -> str | None:
        """The report's warning when an input beats the merge (None when none does); its
        remedy depends on whether the merge was already ``distilled``."""
        beaten = [m for m in self.inputs if m.agreement > self.merged.agreement]
        if not beaten:
            return None
        best = max(beaten, key=lambda m: (m.agreement, -m.kl))
        gap, se = 100 * (best.agreement - self.merged.agreement), 100 * (best.paired_se or 0.0)
        noise = "; within two standard errors: may be noise" if gap <= 2 * se else ""
        remedy = (
            "distil on more unlabelled data (--distill-data) or for longer"
            if distilled
            else "train the merge towards the ensemble with --distill auto, best on more "
            "unlabelled data (--distill-data)"
        )
        n = self.num_samples
        return (
            f"the merge agrees with the inputs' ensemble on {round(self.merged.agreement * n)} "
            f"of {n} held-out {self.unit} ({100 * self.merged.agreement:.1f} %), {best.name} alone "
            f"on {round(best.agreement * n)} ({100 * best.agreement:.1f} %, {gap:.1f} ± {se:.1f} "
            f"points{noise}; {len(beaten)} of {len(self.inputs)} inputs do better than the "
            f"merge): keep the better input, or {remedy}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_samples": self.num_samples,
            "unit": self.unit,
            "merged": self.merged.to_dict(),
            "inputs": [m.to_dict() for m in self.inputs],
            "beaten_by": self.beaten_by,
        }


def check_outputs(
    merged: torch.Tensor,
    inputs: Sequence[torch.Tensor],
    names: Sequence[str],
    weights: Sequence[float],
    unit: str = "samples",
) -> MergeCheck:
    """The check from held-out logits: the merge's and each input model's (``unit``: what
    a row of them is)."""
    ensemble = ensemble_logits(list(inputs), list(weights))
    top1 = ensemble.argmax(-1)
    merged_agrees = merged.argmax(-1) == top1

    def against_ensemble(name: str, logits: torch.Tensor, paired: bool = True) -> Agreement:
        _, kl, agreement, _ = score_outputs(logits, ensemble, None, "agreement")
        se = paired_standard_error(logits.argmax(-1) == top1, merged_agrees) if paired else None
        return Agreement(name, agreement, kl, se)

    return MergeCheck(
        against_ensemble("merged", merged, paired=False),
        tuple(against_ensemble(n, lg) for n, lg in zip(names, inputs, strict=True)),
        merged.shape[0],
        unit,
    )


def paired_standard_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """The standard error of ``mean(a) - mean(b)`` for paired booleans (one pair per
    row): ``sqrt((p10 + p01 - (p10 - p01)^2) / n)`` with ``p10``, ``p01`` the fractions of
    rows where only ``a``, only ``b`` holds."""
    n = a.numel()
    only_a = float((a & ~b).double().mean()) if n else 0.0
    only_b = float((b & ~a).double().mean()) if n else 0.0
    return ((only_a + only_b - (only_a - only_b) ** 2) / max(n, 1)) ** 0.5


def check_merge(
    loaded: LoadedModels,
    merged_model: nn.Module,
    heldout: Calibration,
    weights: Sequence[float],
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
    unit = "next tokens" if next_token(data) else "samples"
    return check_outputs(merged, inputs, loaded.paths, weights, unit)
