"""Step 4, assemble: transform every tensor along its grouped axes and average
(:mod:`ccamerge.maths.algebra`), then, unless the refit (step 5) follows, fix BatchNorm
(:mod:`ccamerge.maths.bn`) or, without BatchNorm, rescale the merged units (REPAIR,
:mod:`ccamerge.maths.repair`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..maths.algebra import merge_state_dicts
from ..maths.bn import has_batchnorm, renorm_targets, renormalise_batchnorm, reset_batchnorm
from ..maths.repair import repair_merged
from ..maths.stats import Statistics
from ..methods import (
    Alignment,
    MergeMethod,
)
from ..runtime.errors import OptionError
from .load import Calibration, LoadedModels

BN_MODES = ("auto", "vector", "renorm")


@dataclass(frozen=True)
class BatchNormSettings:
    """What a merge without the refit does to BatchNorm: ``reset`` the running statistics on
    calibration data (False: keep the averaged ones), with ``mode`` "vector" (a plain reset),
    "renorm" (renormalised to the aligned targets first; REPAIR without BatchNorm) or
    "auto" (vector for permutation methods, renorm for the others)."""

    mode: str = "auto"
    reset: bool = True

    def for_method(self, method: MergeMethod) -> BatchNormSettings:
        """These settings with ``auto`` resolved for ``method``."""
        return dataclasses.replace(self, mode=resolve_bn_mode(self.mode, method))


def resolve_bn_mode(bn_mode: str, method: MergeMethod) -> str:
    if bn_mode not in BN_MODES:
        raise OptionError(f"--bn-mode must be one of {', '.join(BN_MODES)}")
    if bn_mode != "auto":
        return bn_mode
    return "vector" if method.permutation_only else "renorm"


@dataclass(frozen=True)
class MergeRecipe:
    """What to assemble: the merge ``weights``, the ``reference`` (the model the others are
    aligned to; its tensor dtypes are the result's), the BatchNorm handling of a merge
    without the refit, the device, and each model's transforms (``alignment``) once they
    are known."""

    weights: Sequence[float]
    reference: int
    batchnorm: BatchNormSettings = BatchNormSettings()
    device: str = "cpu"  # where the merged model is built
    alignment: Alignment | None = None

    def aligned(self, alignment: Alignment, method: MergeMethod) -> MergeRecipe:
        """This recipe with ``method``'s ``alignment`` (and BatchNorm mode)."""
        return dataclasses.replace(
            self, alignment=alignment, batchnorm=self.batchnorm.for_method(method)
        )

    @property
    def transforms(self) -> Alignment:
        if self.alignment is None:
            raise ValueError("the recipe has no alignment yet")
        return self.alignment


def build_merged(
    loaded: LoadedModels,
    recipe: MergeRecipe,
    calib: Calibration | None,
    stats: Statistics | None,
) -> tuple[dict[str, torch.Tensor], nn.Module, str]:
    """Transform and average, then fix BatchNorm ("renorm" on a network without BatchNorm:
    REPAIR, :mod:`ccamerge.maths.repair`). Returns (state dict, model, what was done)."""
    model = assemble(loaded, recipe)
    bn_done = fix_batchnorm(model, loaded, recipe, calib, stats)
    return state_of(model, loaded, recipe.reference), model, bn_done


def assemble(loaded: LoadedModels, recipe: MergeRecipe) -> nn.Module:
    """The merged network: every tensor transformed along its grouped axes and averaged,
    BatchNorm running statistics averaged like any tensor."""
    alignment = recipe.transforms
    Ms, Us = zip(*(alignment.model_transforms(k) for k in range(len(loaded.state_dicts))))
    wide = [_widened(sd) for sd in loaded.state_dicts]  # one rounding, at the very end
    merged = merge_state_dicts(wide, loaded.spec, Ms, Us, recipe.weights, recipe.reference)
    return loaded.build(merged, recipe.device)


def fix_batchnorm(
    model: nn.Module,
    loaded: LoadedModels,
    recipe: MergeRecipe,
    calib: Calibration | None,
    stats: Statistics | None,
) -> str:
    """Reset or renormalise the BatchNorms of the assembled ``model`` in place (without
    BatchNorm, "renorm": REPAIR); returns what was done."""
    bn, weights = recipe.batchnorm, recipe.weights
    if not has_batchnorm(model):
        bn_done = "none (no BatchNorm)"
        if bn.mode == "renorm" and bn.reset and calib is not None:
            n = repair_merged(
                model, loaded, recipe.transforms, weights, calib.data, calib.batch_size,
                calib.device,
            )  # fmt: skip
            if n:
                bn_done = f"no BatchNorm: {n} layers renormalised to aligned targets (REPAIR)"
        return bn_done
    if not bn.reset:
        return "kept merged running statistics (--no-reset-bn)"
    if calib is None:
        return "not reset: no calibration data"
    if bn.mode == "renorm" and stats is not None and stats.norms:
        targets = {}
        for g in loaded.spec.groups:
            for name in g.norms:
                M = recipe.transforms.groups[g.name].M
                targets[name] = renorm_targets(stats.norms[name], M, weights)
        n = renormalise_batchnorm(model, targets, calib.batches(), calib.device)
        return f"renormalised to aligned targets and reset on {n} samples"
    n = reset_batchnorm(model, calib.batches(), calib.device)
    return f"running statistics reset on {n} samples"


def needs_norm_statistics(loaded: LoadedModels, bn: BatchNormSettings) -> bool:
    """Whether fixing BatchNorm needs the statistics of the models' BatchNorm outputs (the
    renormalisation targets)."""
    return bn.reset and bn.mode == "renorm" and any(g.norms for g in loaded.spec.groups)


def state_of(model: nn.Module, loaded: LoadedModels, reference: int) -> dict[str, torch.Tensor]:
    """``model``'s tensors on the CPU, each in the dtype of the reference's tensor."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for name, t in loaded.state_dicts[reference].items():
        state[name] = state[name].to(t.dtype)
    model.load_state_dict(state)  # the model scores what is written (fp16, fp8 rounding)
    return state


def _widened(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Floating tensors narrower than float32 (float16, bfloat16, float8) as float32."""
    return {
        k: v.float() if v.is_floating_point() and v.element_size() < 4 else v for k, v in sd.items()
    }
