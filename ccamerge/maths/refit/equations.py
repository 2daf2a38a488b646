"""The normal equations of one layer's least-squares fit, streamed over calibration
rows in float64, their solve, and the per-channel moments a BatchNorm is given."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from ...runtime import distributed
from ..stats import gram
from .plan import Fit, Layer, conv_padding

_BLOCK_ELEMENTS = 1 << 22  # rows x inputs of one block of the normal equations (16 MiB in float32)


class NormalEquations:
    """``G = sum x x^T``, ``R = sum x t^T`` and ``sum |t|^2`` over streamed rows, in
    float64 (each block's products formed in the rows' precision)."""

    def __init__(self, inputs: int, outputs: int, device: torch.device | str = "cpu") -> None:
        self.G = torch.zeros(inputs, inputs, dtype=torch.float64, device=device)
        self.R = torch.zeros(inputs, outputs, dtype=torch.float64, device=device)
        self.target_norm = torch.zeros((), dtype=torch.float64, device=device)
        self.samples = 0

    def add(self, X: torch.Tensor, T: torch.Tensor) -> None:
        """Rows ``X`` (n x p) with their targets ``T`` (n x out)."""
        if X.dtype not in (torch.float32, torch.float64):  # half precision: sum in float32
            X, T = X.float(), T.float()
        XT = X.T
        self.G += gram(XT, XT).to(torch.float64)
        self.R += gram(XT, T.T).to(torch.float64)
        self.target_norm += torch.sum(T * T, dtype=torch.float64)
        self.samples += X.shape[0]

    def reduce_across_ranks(self) -> None:
        """Under distribution: every rank's sums added (the same bits on every rank)."""
        if not distributed.is_distributed():
            return
        count = torch.tensor([float(self.samples)], dtype=torch.float64, device=self.G.device)
        distributed.all_reduce_sum([self.G, self.R, self.target_norm, count])
        self.samples = int(count)

    def residual(self, WT: torch.Tensor) -> float | None:
        """``||W x - t||^2 / ||t||^2`` for ``WT`` (p x out); None when every target is 0."""
        tt = float(self.target_norm)
        if tt <= 0:
            return None
        err = float((self.G @ WT * WT).sum() - 2 * (self.R * WT).sum()) + tt
        return max(err, 0.0) / tt

    def solve(self, W0T: torch.Tensor, ridge: float) -> torch.Tensor | None:
        """``(G + lam I)^-1 (R + lam W0^T)``, ``lam = ridge trace(G) / p``; None when that
        is not finite.

        G is positive semi-definite, but products formed in float32 can leave it
        slightly indefinite where the inputs are (nearly) collinear; when the Cholesky
        factorisation fails, the solve uses G's eigendecomposition with the negative
        eigenvalues set to 0."""
        G, p = self.G, self.G.shape[0]
        if not (torch.isfinite(G).all() and torch.isfinite(self.R).all()):
            return None
        lam = ridge * float(torch.trace(G)) / p
        B = self.R + lam * W0T
        L, info = torch.linalg.cholesky_ex(G + lam * torch.eye(p, dtype=G.dtype, device=G.device))
        if int(info) == 0:
            WT = torch.cholesky_solve(B, L)
        else:
            e, V = torch.linalg.eigh(G)
            WT = V @ ((V.T @ B) / (e.clamp_min(0) + lam)[:, None])
        return WT if torch.isfinite(WT).all() else None


def rows(fit: Fit, x: torch.Tensor, t: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Blocks of (inputs, targets) rows of ``fit`` on one chunk (``t``: the targets of
    the samples that give rows, :func:`_kept`); conv inputs as patches."""
    x = x[: t.shape[0]]
    layer = fit.layer
    if layer.conv:
        padding = conv_padding(layer)
        patch = layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1]
        positions = t.shape[2] * t.shape[3]
        step = max(1, _BLOCK_ELEMENTS // (patch * positions))
        for i in range(0, x.shape[0], step):
            cols = F.unfold(
                x[i : i + step], layer.kernel_size, layer.dilation, padding, layer.stride
            )
            X = cols.transpose(1, 2).reshape(-1, patch)
            T = t[i : i + step].flatten(2).transpose(1, 2).reshape(-1, t.shape[1])
            yield _with_constant(X, fit), T
    else:
        X, T = x.reshape(-1, layer.inputs), t.reshape(-1, layer.outputs)
        step = max(1, _BLOCK_ELEMENTS // layer.inputs)
        for i in range(0, X.shape[0], step):
            yield _with_constant(X[i : i + step], fit), T[i : i + step]


def output_rows(layer: Layer, group: int) -> slice:
    """The output channels of conv group ``group`` (all of them for one group)."""
    n = layer.outputs // layer.groups
    return slice(group * n, (group + 1) * n)


def group_rows(
    fit: Fit, X: torch.Tensor, T: torch.Tensor, group: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of conv group ``group`` of a grouped conv: its input channels' patch
    columns (and the constant) and its output channels' targets."""
    layer = fit.layer
    if layer.groups == 1:
        return X, T
    n = layer.weight[0].numel()
    cols = X[:, group * n : (group + 1) * n]
    if fit.has_bias:
        cols = torch.cat([cols, X[:, -1:]], 1)
    return cols, T[:, output_rows(layer, group)]


def _with_constant(X: torch.Tensor, fit: Fit) -> torch.Tensor:
    return torch.cat([X, X.new_ones(X.shape[0], 1)], 1) if fit.has_bias else X


def current_weights(fit: Fit, eq: NormalEquations, part: slice = slice(None)) -> torch.Tensor:
    """The averaged weights as ``W0^T`` (p x out, float64), the prior of the fit.

    A folded BatchNorm is folded with the running statistics a reset would measure: the
    mean and (unbiased) variance of the layer's output on the merged inputs, read off
    ``G`` (its last row holds the inputs' sums, since the last input is the constant 1).
    The averaged running statistics are not used: under a dense alignment they are no
    statistics of anything (a variance can even come out negative). ``part``: the
    output channels of one conv group."""
    layer = fit.layer
    W = layer.weight[part].detach().double().flatten(1)
    b = layer.bias[part].detach().double() if layer.bias is not None else torch.zeros_like(W[:, 0])
    if fit.bn is not None:
        WbT = torch.cat([W, b[:, None]], 1).T
        n = max(eq.samples, 1)
        mean = eq.G[-1] @ WbT / n
        var = ((eq.G @ WbT * WbT).sum(0) / n - mean.square()).clamp_min(0) * n / max(n - 1, 1)
        scale = fit.bn.weight[part].detach().double() / (var + fit.bn.eps).sqrt()
        W, b = scale[:, None] * W, scale * (b - mean) + fit.bn.bias[part].detach().double()
    return (torch.cat([W, b[:, None]], 1) if fit.has_bias else W).T.contiguous()


def write_weights(fit: Fit, WT: torch.Tensor, part: slice = slice(None)) -> torch.Tensor | None:
    """Put the fitted ``W^T`` (p x out) into the layer (``part``: the output channels of
    one conv group); returns the bias its folded BatchNorm must add (None without one)."""
    layer = fit.layer
    W = WT.T
    b = W[:, -1] if fit.has_bias else None
    weight = layer.weight[part]
    weight.copy_(W[:, : W.shape[1] - int(fit.has_bias)].reshape(weight.shape))
    if fit.bn is not None:
        if layer.bias is not None:
            layer.bias[part].zero_()  # the BatchNorm's shift carries the bias
        return b
    if layer.bias is not None:
        layer.bias[part].copy_(b)
    return None


class AffineEquations:
    """Per channel c, the sums of the fit ``t_c ~ gain_c n_c + bias_c`` (a LayerNorm's
    affine part: n its normalised input, channels on the last axis), in float64; without
    a bias, ``t_c ~ gain_c n_c``."""

    KEYS = ("nn", "n", "nt", "t", "tt")

    def __init__(self, channels: int, bias: bool, device: torch.device | str = "cpu") -> None:
        self.bias = bias
        self.sums = {
            k: torch.zeros(channels, dtype=torch.float64, device=device) for k in self.KEYS
        }
        self.samples = 0

    def add(self, n: torch.Tensor, t: torch.Tensor) -> None:
        """Rows ``n`` (normalised inputs) and ``t`` (targets), both (rows, channels)."""
        n, t = n.to(torch.float64), t.to(torch.float64)
        for key, v in zip(self.KEYS, (n * n, n, n * t, t, t * t)):
            self.sums[key] += v.sum(0)
        self.samples += n.shape[0]

    def reduce_across_ranks(self) -> None:
        if not distributed.is_distributed():
            return
        count = self.sums["n"].new_tensor([float(self.samples)])
        distributed.all_reduce_sum([*self.sums.values(), count])
        self.samples = int(count)

    def solve(
        self, gain: torch.Tensor, bias: torch.Tensor | None, ridge: float
    ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The fitted ``(gain, bias)``, ridge-regularised towards the current ones with
        ``lam = ridge (mean_c sum n_c^2 + rows)`` (without a bias: ``ridge mean_c sum
        n_c^2``); None when that is not finite."""
        s, g0 = self.sums, gain.detach().double()
        if not self.bias:
            lam = ridge * float(s["nn"].mean())
            g = (s["nt"] + lam * g0) / (s["nn"] + lam)
            return (g, None) if torch.isfinite(g).all() else None
        b0 = bias.detach().double()
        lam = ridge * float(s["nn"].mean() + self.samples)
        a, b, d = s["nn"] + lam, s["n"], self.samples + lam
        r1, r2 = s["nt"] + lam * g0, s["t"] + lam * b0
        det = a * d - b * b
        g, c = (d * r1 - b * r2) / det, (a * r2 - b * r1) / det
        return (g, c) if torch.isfinite(g).all() and torch.isfinite(c).all() else None

    def residual(self, gain: torch.Tensor, bias: torch.Tensor | None) -> float | None:
        """``sum |gain n + bias - t|^2 / sum |t|^2``; None when every target is 0."""
        s, g = self.sums, gain.detach().double()
        err = g * g * s["nn"] - 2 * g * s["nt"] + s["tt"]
        if bias is not None:
            c = bias.detach().double()
            err = err + 2 * g * c * s["n"] + c * c * self.samples - 2 * c * s["t"]
        tt = float(s["tt"].sum())
        return max(float(err.sum()), 0.0) / tt if tt > 0 else None


class Moments:
    """Per-channel count, mean and sum of squared deviations (channels on axis 1),
    merged over chunks in float64 (Chan et al.'s pairwise update)."""

    def __init__(self, channels: int, device: torch.device | str = "cpu") -> None:
        self.n = 0
        self.mean = torch.zeros(channels, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(channels, dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor) -> None:
        """One chunk's values. Deviations from a first mean are taken in the values'
        precision (float32 at least) and summed in float64, which corrects that mean to
        float64 accuracy: a bias written as ``b + mean`` can cancel to a small number."""
        v = x.detach().transpose(0, 1).reshape(x.shape[1], -1)
        if v.dtype not in (torch.float32, torch.float64):
            v = v.float()
        n, shift = v.shape[1], v.mean(1)
        deviation = v - shift[:, None]
        offset = deviation.sum(1, dtype=torch.float64) / n
        mean = shift.double() + offset
        squares = torch.linalg.vecdot(deviation, deviation).double()
        m2 = (squares - n * offset.square()).clamp_min(0)
        total = self.n + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.n * n / total)
        self.n = total

    def reduce_across_ranks(self) -> None:
        """Under distribution: the moments of every rank's values together. First the
        count and the sums give the common mean; then each rank's squared deviations
        about that mean, ``m2 + n (mean - common)^2``, are added."""
        if not distributed.is_distributed():
            return
        sums = torch.cat([self.mean.new_tensor([float(self.n)]), self.mean * self.n])
        distributed.all_reduce_sum([sums])
        n = int(sums[0])
        common = sums[1:] / max(n, 1)
        m2 = (self.m2 + self.n * (self.mean - common).square()).contiguous()
        distributed.all_reduce_sum([m2])
        self.n, self.mean, self.m2 = n, common, m2

    @property
    def variance(self) -> torch.Tensor:
        """Unbiased, as a train-mode BatchNorm records it."""
        return self.m2 / max(self.n - 1, 1)


# ---------------------------------------------------------------------------
