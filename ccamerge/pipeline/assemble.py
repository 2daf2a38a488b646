"""Step 4, assemble: transform every tensor along its grouped axes and average
(:mod:`ccamerge.maths.algebra`), then, unless the refit (step 5) follows, fix BatchNorm
(:mod:`ccamerge.maths.bn`) or, without BatchNorm, rescale the merged units (REPAIR,
:mod:`ccamerge.maths.repair`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..io.files import (
    Dataset,
)
from ..maths.algebra import merge_state_dicts
from ..maths.bn import has_batchnorm, renorm_targets, renormalise_batchnorm, reset_batchnorm
from ..maths.repair import repair_merged
from ..maths.stats import Statistics
from ..methods import (
    Alignment,
    MergeMethod,
)
from ..runtime.errors import OptionError
from .load import LoadedModels

BN_MODES = ("auto", "vector", "renorm")


def resolve_bn_mode(bn_mode: str, method: MergeMethod) -> str:
    if bn_mode not in BN_MODES:
        raise OptionError(f"--bn-mode must be one of {', '.join(BN_MODES)}")
    if bn_mode != "auto":
        return bn_mode
    return "vector" if method.permutation_only else "renorm"


def build_merged(
    loaded: LoadedModels,
    alignment: Alignment,
    weights: Sequence[float],
    reference: int,
    calib: Dataset | None,
    stats: Statistics | None,
    bn_mode: str,
    reset_bn: bool,
    batch_size: int,
    device: str,
) -> tuple[dict[str, torch.Tensor], nn.Module, str]:
    """Transform and average, then fix BatchNorm (``bn_mode`` "renorm" on a network without
    BatchNorm: REPAIR, :mod:`ccamerge.maths.repair`). Returns (state dict, model, what was done)."""
    model = assemble(loaded, alignment, weights, reference, device)
    bn_done = fix_batchnorm(
        model, loaded, alignment, weights, calib, stats, bn_mode, reset_bn, batch_size, device
    )
    return state_of(model, loaded, reference), model, bn_done


def assemble(
    loaded: LoadedModels,
    alignment: Alignment,
    weights: Sequence[float],
    reference: int,
    device: str,
) -> nn.Module:
    """The merged network: every tensor transformed along its grouped axes and averaged,
    BatchNorm running statistics averaged like any tensor."""
    Ms, Us = zip(*(alignment.model_transforms(k) for k in range(len(loaded.state_dicts))))
    wide = [_widened(sd) for sd in loaded.state_dicts]  # one rounding, at the very end
    merged = merge_state_dicts(wide, loaded.spec, Ms, Us, weights, reference)
    return loaded.build(merged, device)


def fix_batchnorm(
    model: nn.Module,
    loaded: LoadedModels,
    alignment: Alignment,
    weights: Sequence[float],
    calib: Dataset | None,
    stats: Statistics | None,
    bn_mode: str,
    reset_bn: bool,
    batch_size: int,
    device: str,
) -> str:
    """Reset or renormalise the BatchNorms of the assembled ``model`` in place (without
    BatchNorm, "renorm": REPAIR); returns what was done."""
    if not has_batchnorm(model):
        bn_done = "none (no BatchNorm)"
        if bn_mode == "renorm" and reset_bn and calib is not None:
            n = repair_merged(model, loaded, alignment, weights, calib, batch_size, device)
            if n:
                bn_done = f"no BatchNorm: {n} layers renormalised to aligned targets (REPAIR)"
        return bn_done
    if not reset_bn:
        return "kept merged running statistics (--no-reset-bn)"
    if calib is None:
        return "not reset: no calibration data"
    if bn_mode == "renorm" and stats is not None and stats.norms:
        targets = {}
        for g in loaded.spec.groups:
            for bn in g.norms:
                targets[bn] = renorm_targets(stats.norms[bn], alignment.groups[g.name].M, weights)
        n = renormalise_batchnorm(model, targets, calib.batches(batch_size), device)
        return f"renormalised to aligned targets and reset on {n} samples"
    n = reset_batchnorm(model, calib.batches(batch_size), device)
    return f"running statistics reset on {n} samples"


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
