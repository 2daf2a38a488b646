"""Step 6, distill (``--distill``, off by default): the refitted merge trained end to end
against the inputs' mean logits (:mod:`ccamerge.maths.distill`, docs/distill.md), on the
calibration samples the merge was fitted on or on a separate unlabelled set
(``--distill-data``, streamed), scored every epoch on the check's held-out samples."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..io.files import DataStream
from ..maths.distill import AUGMENTATIONS, DistillReport, DistillSettings, EpochMetrics, distill
from ..runtime.context import RunContext
from ..runtime.errors import OptionError
from .assemble import MergeRecipe
from .load import Calibration, LoadedModels


@dataclass(frozen=True)
class Distillation:
    """``--distill`` as a run takes it: ``epochs`` None (off), a number or ``"auto"`` (while
    the held-out KL to the ensemble falls), the input ``augment``\\ ations, and every other
    setting of :class:`DistillSettings` (``settings``; its seed is the run's)."""

    epochs: int | str | None = None
    augment: tuple[str, ...] = ()
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        return self.epochs is not None

    def resolved(self, seed: int) -> DistillSettings:
        """The full settings (checked: an :class:`OptionError` names what is wrong)."""
        options = {"seed": seed, **self.settings}
        return DistillSettings(epochs=self.epochs, augment=tuple(self.augment), **options)


def parse_epochs(text: str | int | None) -> int | str | None:
    """``--distill``: ``auto`` or a number of epochs (at least 1); None: off."""
    if text is None or text == "auto" or (isinstance(text, int) and not isinstance(text, bool)):
        return text
    try:
        return int(str(text))
    except ValueError:
        raise OptionError(f"--distill takes 'auto' or a number of epochs, not {text!r}") from None


def parse_augment(text: str | None) -> tuple[str, ...]:
    """``--augment flip,crop``: the names, checked."""
    names = tuple(a.strip() for a in (text or "").split(",") if a.strip())
    unknown = [a for a in names if a not in AUGMENTATIONS]
    if unknown:
        raise OptionError(
            f"--augment: unknown augmentation {', '.join(unknown)} (choose among "
            f"{', '.join(AUGMENTATIONS)})"
        )
    return names


def check_augmentable(augment: tuple[str, ...], sample_shape: tuple[int, ...]) -> None:
    """Image augmentations need samples of shape (C, H, W): refused up front otherwise."""
    if augment and len(sample_shape) != 3:
        raise OptionError(
            f"--augment {','.join(augment)} needs image inputs of shape (C, H, W); the "
            f"distillation data has samples of shape {tuple(sample_shape)}"
        )


@dataclass(frozen=True)
class DistillJob:
    """One distillation: what the student trains on (``batches()``: fresh chunks on every
    call; ``source`` names them for the report), the held-out inputs that score every
    epoch, and the settings."""

    batches: Callable[[], Iterable[torch.Tensor]]
    source: dict[str, Any]
    heldout: Calibration
    settings: DistillSettings

    @classmethod
    def of(
        cls,
        fitted: Calibration,
        heldout: Calibration,
        stream: DataStream | None,
        settings: DistillSettings,
    ) -> DistillJob:
        """On ``stream`` when given, else on the calibration samples the merge fitted on."""
        if stream is None:
            source = {"data": "calibration", "samples": len(fitted)}
            return cls(fitted.batches, source, heldout, settings)
        source = {"data": Path(stream.path).name, "samples": stream.samples}
        return cls(stream.chunks, source, heldout, settings)


def distill_merged(
    loaded: LoadedModels, recipe: MergeRecipe, model: nn.Module, job: DistillJob, ctx: RunContext
) -> DistillReport:
    """Train the merged ``model`` in place; a progress bar over the epochs shows the
    held-out agreement with the ensemble."""
    device = job.heldout.device
    teachers = [loaded.build(sd, device) for sd in loaded.state_dicts]
    heldout = job.heldout.data.x

    def on_epoch(epoch: int, total: int, metrics: EpochMetrics) -> None:
        if epoch == 0:
            ctx.progress.start("distill", total)
        else:
            ctx.progress.advance(1)
        ctx.progress.describe(f"distill (agreement {100 * metrics.agreement:.1f} %)")

    try:
        with ctx.timer.phase("distill"):
            return distill(
                model, teachers, recipe.weights, job.batches, heldout, job.settings, on_epoch
            )
    finally:
        ctx.progress.stop()
