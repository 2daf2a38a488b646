"""The refit of a network torch.fx cannot trace (the models of ``transformers``): its
linear layers, LayerNorms and RMS norms refitted one at a time, in the order the forward
pass calls them, with module hooks (docs/refit.md, "Networks that cannot be traced").

For each layer, on the calibration batches: the endpoints' outputs of that layer,
mapped into the merged units by the maps of its output group and averaged with the merge
weights, are the target; the merged network's input to the layer (after the layers
before it were refitted) is the input. A linear layer (``nn.Linear``, or transformers'
``Conv1D``, which stores its weight as (in, out)) is fitted by ridge-regularised least
squares toward its current weights; a LayerNorm's gain and bias, or an RMS norm's gain
(:func:`_rms_eps` recognises one), per channel on its normalised input. A forward pass
stops at the layer it serves. Other layers (a ViT's patch convolution, embeddings, a
head tied to the embeddings) keep their aligned, averaged weights. A network with
BatchNorm is not refitted this way (its statistics would not follow).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...io.padding import real_positions, real_rows
from ...models.hf_layouts import is_conv1d
from ...models.spec import MergeSpec
from ...runtime.errors import RefitError
from .equations import AffineEquations, NormalEquations
from .settings import LayerFit, RefitReport, RefitSettings

HOOKS_MODE = "module hooks"  # RefitReport.mode of this refit
NORMS = ("layernorm", "rmsnorm")  # the kinds of layer fitted per channel


class _Reached(Exception):
    """Raised by a hook to stop a forward pass at the layer it serves."""


def _kind(m: nn.Module) -> str | None:
    if isinstance(m, nn.Linear) or is_conv1d(m):
        return "linear"
    if isinstance(m, nn.LayerNorm) and m.weight is not None and len(m.normalized_shape) == 1:
        return "layernorm"
    if _rms_eps(m) is not None:
        return "rmsnorm"
    return None


def _rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / sqrt(mean(x^2) + eps)`` over the last axis, in float64."""
    x = x.to(torch.float64)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _rms_eps(m: nn.Module) -> float | None:
    """The epsilon of an RMS norm with a gain over the last axis (``nn.RMSNorm``, the
    Llama family's ``*RMSNorm``), recognised by what it computes: ``weight * x /
    sqrt(mean(x^2) + eps)`` on a random input; None for any other module (a norm that
    computes ``(1 + weight) * ...`` is not one)."""
    weight = getattr(m, "weight", None)
    eps = getattr(m, "variance_epsilon", getattr(m, "eps", None))
    if isinstance(m, nn.RMSNorm) and eps is None:
        eps = torch.finfo(torch.float32).eps
    if not (isinstance(weight, nn.Parameter) and weight.dim() == 1 and isinstance(eps, float)):
        return None
    if getattr(m, "bias", None) is not None or list(m.children()):
        return None
    x = torch.randn(3, weight.numel(), generator=torch.Generator().manual_seed(0)).to(weight)
    try:
        with torch.no_grad():
            y = m(x)
    except Exception:  # noqa: BLE001 - whatever else the module is, it is not this norm
        return None
    expected = weight.detach().double() * _rms_norm(x, eps)
    tol = 1e-3 if weight.dtype in (torch.float32, torch.float64) else 3e-2  # half precision
    same = y.shape == expected.shape and torch.allclose(y.double(), expected, rtol=tol, atol=tol)
    return eps if same else None


def _tied(model: nn.Module) -> set[str]:
    """Modules holding a parameter that another name shares (a tied output head)."""
    owners: dict[int, set[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), set()).add(name.rpartition(".")[0])
    return {m for names in owners.values() if len(names) > 1 for m in names}


def call_order(model: nn.Module, x: torch.Tensor) -> list[str]:
    """The refittable layers in the order one forward pass calls them, but those holding
    a tied weight (fitting one would change the other: GPT-2's head is its token
    embedding); a layer called twice is an error."""
    order: list[str] = []
    handles = []
    tied = _tied(model)
    for name, m in model.named_modules():
        if _kind(m) is not None and name not in tied:
            handles.append(m.register_forward_pre_hook(lambda mod, a, n=name: order.append(n)))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    twice = sorted({n for n in order if order.count(n) > 1})
    if twice:
        raise RefitError(f"layer {twice[0]} is called more than once in a forward pass")
    return order


def _ungrouped_norms(model: nn.Module, order: list[str], spec: MergeSpec) -> list[str]:
    """The norms of ``order`` whose gain is in no feature group of a spec that has groups
    (a query/key norm over each head's units: the heads, its rows, move between models,
    so no target could be paired with the merge's rows); none when nothing is aligned."""
    if not spec.groups:
        return []
    return [
        name
        for name in order
        if _kind(model.get_submodule(name)) in NORMS and f"{name}.weight" not in spec.axes
    ]


def _at(model: nn.Module, name: str, x: torch.Tensor, output: bool) -> torch.Tensor:
    """The input (or output) of layer ``name`` when ``model`` runs on ``x``, as rows (of
    the real tokens only, when ``x`` is padded)."""
    seen: list[torch.Tensor] = []

    def hook(mod, args, out):
        seen.append((out if output else args[0]).detach())
        raise _Reached

    handle = model.get_submodule(name).register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(x)
    except _Reached:
        pass
    finally:
        handle.remove()
    if not seen:
        raise RefitError(f"layer {name} is not reached by a forward pass")
    value = real_rows(seen[0], real_positions(x))
    return value.reshape(-1, value.shape[-1])


def _output_map(name: str, spec: MergeSpec, maps: Mapping[str, torch.Tensor], device) -> Any:
    """A model's map of layer ``name``'s outputs into the merged units (None: identity),
    from its ``maps`` by group: its output group's, or for a fused query/key/value
    projection the block-diagonal map of its three parts' groups."""
    parts = [f"{name}.weight"] + [f"{name}.{p}_weight" for p in ("q", "k", "v")]
    found = []
    for tensor in parts:
        group = spec.axes.get(tensor, {}).get(0)
        if group is not None and group in maps:
            found.append(maps[group].to(device, torch.float64))
    if not found:
        return None
    return found[0] if len(found) == 1 else torch.block_diag(*found)


def _target(
    name: str, endpoints: Sequence[nn.Module], maps: list, weights: Sequence[float], x
) -> torch.Tensor:
    out = 0
    for model, m, w in zip(endpoints, maps, weights):
        y = _at(model, name, x, output=True).to(torch.float64)
        out = out + w * (y if m is None else y @ m.T)
    return out


def _current(m: nn.Module) -> torch.Tensor:
    """inputs (+ 1 with a bias) x outputs: the weight as the fit sees it, then the bias."""
    weight = m.weight.detach().to(torch.float64)
    WT = weight if is_conv1d(m) else weight.T
    if m.bias is None:
        return WT
    return torch.cat([WT, m.bias.detach().to(WT)[None]])


def _fit_linear(m: nn.Module, eqs: NormalEquations, ridge: float) -> tuple:
    W0T = _current(m)
    WT = eqs.solve(W0T, ridge)
    before = eqs.residual(W0T)
    if WT is None:  # not finite: the layer keeps its weights (the caller warns)
        return before, None
    after = eqs.residual(WT)
    weight = WT[:-1] if m.bias is not None else WT
    with torch.no_grad():
        m.weight.copy_((weight if is_conv1d(m) else weight.T).to(m.weight))
        if m.bias is not None:
            m.bias.copy_(WT[-1].to(m.bias))
    return before, after


def _normaliser(m: nn.Module, kind: str | None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """For a norm, the function giving its normalised input (what its gain multiplies);
    None for a linear layer."""
    if kind == "layernorm":
        return lambda x: F.layer_norm(x, m.normalized_shape, eps=m.eps)
    if kind == "rmsnorm":
        eps = _rms_eps(m)
        return lambda x: _rms_norm(x, eps)
    return None


def _fit_norm(m: nn.Module, eqs: AffineEquations, ridge: float) -> tuple:
    """Per channel c, ``t_c ~ gain_c n_c + bias_c`` (n: the normalised input; an RMS norm
    or a LayerNorm without a bias: ``t_c ~ gain_c n_c``)."""
    bias = getattr(m, "bias", None)
    before = eqs.residual(m.weight, bias)
    solved = eqs.solve(m.weight, bias, ridge)
    if solved is None:
        return before, None
    with torch.no_grad():
        m.weight.copy_(solved[0].to(m.weight))
        if bias is not None:
            bias.copy_(solved[1].to(bias))
    return before, eqs.residual(*solved)


def refit_by_hooks(
    merged: nn.Module,
    endpoints: Sequence[nn.Module],
    spec: MergeSpec,
    model_maps: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    batches: Callable[[], Iterable[torch.Tensor]],
    settings: RefitSettings,
    on_layer: Callable[[str, int, int], None] | None = None,
) -> RefitReport:
    """Refit ``merged`` in place, layer by layer (module docstring), towards the
    ``endpoints`` mapped by ``model_maps`` (each model's maps by group and those derived
    from them: :func:`~ccamerge.maths.algebra.with_derived`); the report's ``layers`` say
    what each fit did."""
    device = next((p.device for p in merged.parameters()), torch.device("cpu"))
    for model in (merged, *endpoints):
        model.eval()  # dropout off; the networks are left in eval mode, as the refit does
    first = next(iter(batches()))
    order = call_order(merged, first.to(device))
    if not order:
        raise RefitError("the network has no linear layer or LayerNorm to refit")
    report = RefitReport(HOOKS_MODE, settings.memory_budget, settings.ridge, settings.max_rows)
    ungrouped = _ungrouped_norms(merged, order, spec)
    if ungrouped:
        order = [name for name in order if name not in ungrouped]
        report.warnings.append(
            f"{len(ungrouped)} norms whose units are in no feature group keep their averages "
            f"(their rows may be per head, in each model's order): {', '.join(ungrouped[:3])}"
        )

    limit = settings.max_rows or None
    start = time.perf_counter()
    for i, name in enumerate(order, 1):
        began = time.perf_counter()
        m = merged.get_submodule(name)
        kind = _kind(m)
        normalise = _normaliser(m, kind)
        maps = [_output_map(name, spec, model_maps[k], device) for k in range(len(endpoints))]
        eqs, samples = None, 0
        for x in batches():
            x = x.to(device)
            X = _at(merged, name, x, output=False)
            T = _target(name, endpoints, maps, weights, x)
            if normalise is not None:
                eqs = eqs or AffineEquations(
                    T.shape[1], getattr(m, "bias", None) is not None, device
                )
                eqs.add(normalise(X), T)
            else:
                X = X.to(torch.float64)
                if m.bias is not None:  # the bias: a constant input
                    X = torch.cat([X, X.new_ones(len(X), 1)], 1)
                eqs = eqs or NormalEquations(X.shape[1], T.shape[1], device)
                eqs.add(X, T)
            samples += len(X)
            if limit is not None and samples >= limit:
                break
        if normalise is not None:
            before, after = _fit_norm(m, eqs, settings.ridge)
            inputs = 1 + int(getattr(m, "bias", None) is not None)
        else:
            before, after = _fit_linear(m, eqs, settings.ridge)
            inputs = eqs.G.shape[0]
        if after is None:
            report.warnings.append(
                f"layer {name} keeps its averaged weights: the least-squares solve was not finite"
            )
        seconds = time.perf_counter() - began
        report.layers.append(
            LayerFit(name, kind, None, False, inputs, samples, before, after, seconds)
        )
        if on_layer is not None:
            on_layer(name, i, len(order))
    report.seconds = time.perf_counter() - start
    return report
