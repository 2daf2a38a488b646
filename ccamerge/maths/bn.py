"""BatchNorm after a merge: recompute running statistics, optionally renormalise.

Mixing weights leaves every BatchNorm's running mean and variance wrong for
the merged network. ``reset_batchnorm`` recomputes them with train-mode
forward passes over calibration data and cumulative averaging (momentum
None: the running mean and variance are the means over batches of each
batch's mean and unbiased variance), then switches back to eval mode. Under
distribution (:mod:`ccamerge.runtime.distributed`) each rank sums those per-batch
values in float64 over its share of the batches and the sums are added across
ranks: the same means over batches, computed in float64 rather than by
PyTorch's float32 running update (the two agree to float32 rounding).

``renormalise_batchnorm`` is the recipe of docs/cca.md, 'BatchNorm': set
each BatchNorm's scale and shift to the per-channel std and mean that the
models' aligned BN outputs interpolate to, ``mean = sum_k w_k M_k E[z_k]`` and
``var = sum_k w_k diag(M_k Cov(z_k) M_k^T)``, then recompute the running
statistics so that the merged BN output meets those targets.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from ..runtime import distributed
from ..runtime.errors import DataError
from .stats import JointCovariance

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, _BN) for m in model.modules())


@torch.no_grad()
def reset_batchnorm(
    model: nn.Module, batches: Iterable[torch.Tensor], device="cpu", sharded: bool = False
) -> int:
    """Recompute every BatchNorm's running statistics; returns the number of samples seen.

    Batches of one sample have no batch variance and are skipped; when no batch is
    left the statistics cannot be estimated: :class:`DataError` (never a model whose
    running statistics are the reset defaults). Under distribution each rank takes its
    share of ``batches``; ``sharded``: they are this rank's share already."""
    bns = [m for m in model.modules() if isinstance(m, _BN)]
    if not bns:
        return 0
    if distributed.is_distributed():
        share = batches if sharded else distributed.shard(batches)
        return _reset_from_sums(model, bns, share, device)
    saved = {m: m.momentum for m in bns}
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    seen = skipped = 0
    model.train()
    try:
        for x in batches:
            if x.shape[0] < 2:
                skipped += x.shape[0]  # a single sample has no batch variance
                continue
            model(x.to(device))
            seen += x.shape[0]
    finally:
        for m, mom in saved.items():
            m.momentum = mom
        model.eval()
    if seen == 0:
        raise DataError(
            f"BatchNorm statistics need batches of at least 2 calibration samples; got "
            f"{skipped} sample(s) in batches of 1: give more calibration data (and a "
            "--batch-size of at least 2), or keep the merged statistics with --no-reset-bn"
        )
    return seen


def _reset_from_sums(model: nn.Module, bns: list[nn.Module], batches, device) -> int:
    """:func:`reset_batchnorm` across ranks (``batches``: this rank's share): each
    BatchNorm's per-batch input mean and unbiased variance (train mode, as PyTorch's
    update takes them) summed in float64 over this rank's batches, added across ranks,
    and divided by the number of batches."""
    sums = {m: torch.zeros(2, m.num_features, dtype=torch.float64, device=device) for m in bns}

    def add(m: nn.Module, args: tuple) -> None:
        mean, var = _channel_mean_var(args[0].detach())
        sums[m][0] += mean
        sums[m][1] += var

    handles = [m.register_forward_pre_hook(add) for m in bns]
    counts = torch.zeros(2, dtype=torch.float64)  # batches, samples
    model.train()
    try:
        for x in batches:
            if x.shape[0] < 2:
                continue  # a single sample has no batch variance
            model(x.to(device))
            counts += torch.tensor([1.0, x.shape[0]], dtype=torch.float64)
    finally:
        for h in handles:
            h.remove()
        model.eval()
    distributed.all_reduce_sum([counts, *sums.values()])
    n_batches = int(counts[0])
    for m, (mean, var) in sums.items():
        m.reset_running_stats()
        if n_batches and m.running_mean is not None:
            m.running_mean.copy_(mean / n_batches)
            m.running_var.copy_(var / n_batches)
            m.num_batches_tracked.fill_(n_batches)
    return int(counts[1])


def _channel_mean_var(x: torch.Tensor, chunk: int = 1 << 22) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and unbiased variance of (B, C, ...) activations, in float64
    (two passes over slices of at most about ``chunk`` values, never a float64 copy of
    the whole batch)."""
    C, dims = x.shape[1], [0, *range(2, x.ndim)]
    n = x.numel() // C
    parts = x.split(max(1, chunk // max(1, x[0].numel())))
    mean = sum(p.double().sum(dims) for p in parts) / n
    centre = mean.view(1, C, *([1] * (x.ndim - 2)))
    var = sum(((p.double() - centre) ** 2).sum(dims) for p in parts) / max(n - 1, 1)
    return mean, var


def renorm_targets(
    norm_stats: Sequence[JointCovariance],
    Ms: Sequence[torch.Tensor],
    weights: Sequence[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Target (mean, std) of one merged BatchNorm's output channels (float64)."""
    mean = sum(w * (M @ s.mean_of(0)) for s, M, w in zip(norm_stats, Ms, weights) if w)
    var = sum(w * ((M @ s.block(0, 0)) * M).sum(1) for s, M, w in zip(norm_stats, Ms, weights) if w)
    return mean, var.clamp_min(0).sqrt()


@torch.no_grad()
def renormalise_batchnorm(
    model: nn.Module,
    targets: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    batches: Iterable[torch.Tensor],
    device="cpu",
) -> int:
    """Give BatchNorms ``targets[name] = (mean, std)`` on the calibration data.

    The sign of each channel's scale is kept from the merged weights (exact
    for permutations, where a negative scale must stay negative). After
    the running statistics are recomputed, the scale is corrected for the
    ``eps`` in the denominator."""
    modules = dict(model.named_modules())
    for name, (mean, std) in targets.items():
        bn = modules[name]
        sign = torch.where(bn.weight < 0, -1.0, 1.0).to(torch.float64)
        bn.weight.copy_((sign * std.to(sign.device)).to(bn.weight.dtype))
        bn.bias.copy_(mean.to(bn.bias))
    seen = reset_batchnorm(model, batches, device)
    for name in targets:
        bn = modules[name]
        var = bn.running_var
        bn.weight.mul_(
            torch.where(var > bn.eps, ((var + bn.eps) / var.clamp_min(bn.eps)).sqrt(), 1.0)
        )
    return seen
