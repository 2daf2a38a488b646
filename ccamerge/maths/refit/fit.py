"""The refit itself: every step of the plan in order, the report of what was fitted."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import fx, nn

from ...methods.base import Alignment
from ...models.spec import MergeSpec
from ...runtime import distributed
from ...runtime.errors import OptionError, RefitError, UntracedError
from ..algebra import with_derived
from ..bn import has_batchnorm, reset_batchnorm
from .equations import (
    AffineEquations,
    Moments,
    NormalEquations,
    current_weights,
    group_rows,
    output_rows,
    rows,
    write_weights,
)
from .hooked import refit_by_hooks
from .interpret import Chunk, EndpointOutputs
from .memory import choose_mode, default_memory_budget, first_and_count
from .plan import AffineNorm, Fit, Norm, Opaque, Plan, Step, make_plan
from .settings import LayerFit, RefitReport, RefitSettings

MODES = ("stored", "recompute")


# ---------------------------------------------------------------------------


def _target_maps(
    fit: Fit, model_maps: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float], device
) -> list[tuple[float, torch.Tensor | None]]:
    """``(w_k, M_k)`` of ``fit``'s output group per model (M None: the identity), from
    each model's maps by group and concatenation (:func:`_model_maps`)."""
    if fit.group is None:
        return [(w, None) for w in weights]
    if fit.group not in model_maps[0]:
        raise RefitError(f"the alignment has no transforms for group {fit.group}")
    return [(w, maps[fit.group].to(device)) for maps, w in zip(model_maps, weights)]


def _model_maps(spec: MergeSpec, alignment: Alignment, n: int) -> list[Mapping[str, torch.Tensor]]:
    """Each model's ``M`` by group and the maps derived from them (:func:`with_derived`):
    a layer's outputs may be a concatenation of groups (a fused query/key/value
    projection) or copies of a group of heads (grouped-query attention's queries)."""
    return [
        with_derived(spec, {g: ga.M[k] for g, ga in alignment.groups.items()}) or {}
        for k in range(n)
    ]


def _check_endpoints(merged: nn.Module, endpoints: Sequence[nn.Module]) -> None:
    shapes = {k: v.shape for k, v in merged.state_dict().items()}
    kinds = {name: type(m) for name, m in merged.named_modules()}
    for k, model in enumerate(endpoints):
        if {n: v.shape for n, v in model.state_dict().items()} != shapes or {
            name: type(m) for name, m in model.named_modules()
        } != kinds:
            raise RefitError(f"model {k} does not have the merged network's modules and shapes")


@contextmanager
def _eval_mode(models: Sequence[nn.Module]) -> Iterator[None]:
    """Every module in eval mode; the previous modes restored afterwards."""
    modes = [(m, m.training) for model in models for m in model.modules()]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.train(training)


def _check_options(
    endpoints: Sequence[nn.Module], weights: Sequence[float], settings: RefitSettings
) -> None:
    if not endpoints or len(weights) != len(endpoints):
        raise OptionError(f"{len(weights)} merge weights given for {len(endpoints)} models")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise OptionError("merge weights must be finite, non-negative and not all zero")
    settings.check()


@torch.no_grad()
def refit(
    merged: nn.Module,
    endpoints: Sequence[nn.Module],
    spec: MergeSpec,
    alignment: Alignment,
    weights: Sequence[float],
    batches: Callable[[], Iterable[torch.Tensor]],
    settings: RefitSettings = RefitSettings(),
    on_layer: Callable[[str, int, int], None] | None = None,
    kept: EndpointOutputs | None = None,
) -> RefitReport:
    """Refit ``merged`` in place (weights and BatchNorm buffers) to the endpoints.

    ``endpoints`` are the unmerged models (left untouched), ``alignment`` maps their
    units into the merged network's, ``weights`` are the merge weights, and
    ``batches()`` yields the calibration inputs afresh on every call. ``settings.memory_budget``
    (bytes; default :func:`default_memory_budget`: half the free memory of the device)
    decides between keeping every chunk's activations ("stored") and recomputing them
    per layer ("recompute").
    ``on_layer(name, i, total)`` is called after the i-th of ``total`` layers (i from 1).
    A layer whose calibration rows (samples x output positions) exceed ``max_rows`` is
    fitted on the rows of the first samples of every chunk, about ``max_rows`` in all
    (0: no limit); every sample still runs through the network and feeds the BatchNorm
    statistics. ``kept``: the endpoints' outputs the statistics pass kept on these batches
    (:class:`EndpointOutputs`); the refit then does not run the endpoints (when they were
    dropped or do not match, it does, and says why in the warnings). Raises
    :class:`RefitError` when the network cannot be traced or the endpoints differ from it."""
    _check_options(endpoints, weights, settings)
    ridge, max_rows, memory_budget = settings.ridge, settings.max_rows, settings.memory_budget
    _check_endpoints(merged, endpoints)
    model_maps = _model_maps(spec, alignment, len(endpoints))
    try:
        plan = make_plan(merged, spec)
    except UntracedError as e:
        if has_batchnorm(merged):
            raise  # module hooks cannot give BatchNorms their statistics
        report = refit_by_hooks(
            merged, endpoints, spec, model_maps, weights, batches, settings, on_layer
        )
        report.warnings.insert(
            0,
            f"{e}: the refit ran layer by layer through module hooks ({len(report.layers)} layers; docs/refit.md)",
        )
        return report
    device = next((p.device for p in merged.parameters()), torch.device("cpu"))
    maps = {fit: _target_maps(fit, model_maps, weights, device) for fit in plan.fits}
    start = time.perf_counter()
    if memory_budget is None:
        memory_budget = default_memory_budget(device)
    report = RefitReport("stored", memory_budget, ridge, max_rows, warnings=list(plan.warnings))
    first, samples = first_and_count(batches)
    rows_per_sample = max_rows / samples
    outputs = _usable(kept, plan, batches, rows_per_sample, report)
    if outputs is not None:
        report.endpoint_outputs = "statistics pass"
        memory_budget = None if memory_budget is None else memory_budget - outputs.nbytes
    with _eval_mode([merged, *endpoints]):
        runs = 1 if outputs is not None else len(endpoints) + 1  # networks run per chunk
        report.mode = choose_mode(plan, merged, first, samples, runs, memory_budget, device)

        def chunk(j: int, x: torch.Tensor, wanted: Iterable[Fit]) -> Chunk:
            part = None if outputs is None else outputs.chunks[j]
            x = x.to(device)
            return Chunk(plan, merged, endpoints, maps, x, wanted, rows_per_sample, part)

        if report.mode == "stored":
            stored = [chunk(j, x, plan.fits) for j, x in enumerate(distributed.shard(batches()))]

        def chunks(step: Step) -> Iterable[Chunk]:
            if report.mode == "stored":
                return stored
            wanted = [step] if isinstance(step, Fit) else []
            return (chunk(j, x, wanted) for j, x in enumerate(distributed.shard(batches())))

        folded_bias: dict[fx.Node, torch.Tensor] = {}
        fits = plan.fits
        for step in plan.steps:
            if isinstance(step, Opaque):
                reset_batchnorm(step.module, _inputs(step, chunks(step)), device, sharded=True)
                continue
            if isinstance(step, Norm):
                _measure_norm(step, chunks(step), folded_bias.pop(step.node, None), report)
                continue
            if isinstance(step.layer, AffineNorm):
                _fit_affine_norm(step, chunks(step), ridge, report)
            else:
                bias = _fit_layer(step, chunks(step), ridge, report)
                if bias is not None and step.norm is not None:
                    folded_bias[step.norm] = bias
            if on_layer is not None:
                on_layer(step.name, fits.index(step) + 1, len(fits))
    report.seconds = time.perf_counter() - start
    return report


def _usable(
    kept: EndpointOutputs | None,
    plan: Plan,
    batches: Callable[[], Iterable[torch.Tensor]],
    rows_per_sample: float,
    report: RefitReport,
) -> EndpointOutputs | None:
    """``kept`` when it holds the outputs this refit reads; else None, with a warning
    when outputs were kept but cannot serve."""
    if kept is None:
        return None
    if kept.dropped is not None:
        report.warnings.append(kept.dropped)
        return None
    chunks = sum(1 for _ in distributed.shard(batches()))
    if not kept.matches(plan, chunks, rows_per_sample):
        report.warnings.append(
            "the endpoints' outputs kept by the statistics pass do not match the refit's "
            "plan and batches: the refit ran the endpoints again"
        )
        return None
    return kept


def _inputs(step: Step, chunks: Iterable[Chunk]) -> Iterator[torch.Tensor]:
    """``step``'s merged inputs, chunk by chunk."""
    for chunk in chunks:
        chunk.advance(step)
        yield chunk.input_of(step)


def _fit_layer(
    fit: Fit, chunks: Iterable[Chunk], ridge: float, report: RefitReport
) -> torch.Tensor | None:
    """Accumulate, solve and write one layer (a grouped conv: each conv group on its
    own); returns the bias for its folded BatchNorm."""
    start = time.perf_counter()
    layer = fit.layer
    inputs = layer.weight[0].numel() + int(fit.has_bias)
    device = layer.weight.device
    eqs = [
        NormalEquations(inputs, layer.outputs // layer.groups, device=device)
        for _ in range(layer.groups)
    ]
    for chunk in chunks:
        chunk.advance(fit)
        for X, T in rows(fit, chunk.input_of(fit), chunk.target_of(fit)):
            for g, eq in enumerate(eqs):
                eq.add(*group_rows(fit, X, T, g))
    solved = []
    for g, eq in enumerate(eqs):
        eq.reduce_across_ranks()
        W0T = current_weights(fit, eq, output_rows(layer, g))
        WT = eq.solve(W0T, ridge)
        if WT is None:
            report.warnings.append(
                f"layer {fit.name} keeps its averaged weights: the least-squares solve was "
                "not finite (non-finite activations, or a singular Gram matrix with ridge 0)"
            )
            return None
        solved.append((eq, W0T, WT))
    samples = eqs[0].samples
    if samples < inputs:
        report.warnings.append(
            f"layer {fit.name}: {samples} samples for {inputs} inputs; the ridge towards the "
            "averaged weights decides what the data does not"
        )
    biases = [write_weights(fit, WT, output_rows(layer, g)) for g, (_, _, WT) in enumerate(solved)]
    report.layers.append(
        LayerFit(
            name=fit.name,
            kind="conv" if fit.layer.conv else "linear",
            norm=fit.bn.name if fit.bn is not None else None,
            residual_sum=fit.other is not None,
            inputs=inputs,
            samples=samples,
            residual_before=_residual([(eq, W0T) for eq, W0T, _ in solved]),
            residual_after=_residual([(eq, WT) for eq, _, WT in solved]),
            seconds=time.perf_counter() - start,
        )
    )
    return None if biases[0] is None else torch.cat(biases)


def _fit_affine_norm(fit: Fit, chunks: Iterable[Chunk], ridge: float, report: RefitReport) -> None:
    """Accumulate, solve and write a LayerNorm's gain (and bias): per channel, on its
    normalised merged input."""
    start = time.perf_counter()
    norm = fit.layer
    eqs = AffineEquations(norm.outputs, norm.bias is not None, norm.weight.device)
    for chunk in chunks:
        chunk.advance(fit)
        t = chunk.target_of(fit)
        n = norm.normalise(chunk.input_of(fit)[: t.shape[0]])
        eqs.add(n.reshape(-1, norm.outputs), t.reshape(-1, norm.outputs))
    eqs.reduce_across_ranks()
    before = eqs.residual(norm.weight, norm.bias)
    solved = eqs.solve(norm.weight, norm.bias, ridge)
    if solved is None:
        report.warnings.append(
            f"LayerNorm {fit.name} keeps its averaged gain and bias: the least-squares solve "
            "was not finite"
        )
        return
    norm.weight.copy_(solved[0].to(norm.weight))
    if norm.bias is not None:
        norm.bias.copy_(solved[1].to(norm.bias))
    inputs = 1 + int(norm.bias is not None)
    after = eqs.residual(*solved)
    seconds = time.perf_counter() - start
    report.layers.append(
        LayerFit(fit.name, "layernorm", None, False, inputs, eqs.samples, before, after, seconds)
    )


def _residual(parts: list[tuple[NormalEquations, torch.Tensor]]) -> float | None:
    """The relative residual of all conv groups together."""
    errors = [(eq.residual(WT), float(eq.target_norm)) for eq, WT in parts]
    total = sum(tt for r, tt in errors if r is not None)
    return sum(r * tt for r, tt in errors if r is not None) / total if total > 0 else None


def _measure_norm(
    norm: Norm, chunks: Iterable[Chunk], bias: torch.Tensor | None, report: RefitReport
) -> None:
    """Give a BatchNorm the running statistics of its merged inputs; with the ``bias``
    of a fit folded into it, also ``weight = sqrt(var + eps)``, ``bias = bias + mean``."""
    bn = norm.bn
    moments = Moments(bn.num_features, bn.running_mean.device)
    for x in _inputs(norm, chunks):
        moments.add(x)
    moments.reduce_across_ranks()
    if moments.n < 2:
        report.warnings.append(
            f"BatchNorm {norm.name}: one value per channel, its running variance is set to 0"
        )
    var = moments.variance
    bn.running_mean.copy_(moments.mean)
    bn.running_var.copy_(var)
    if bias is not None:
        bn.weight.copy_((var + bn.eps).sqrt())
        bn.bias.copy_(bias + moments.mean)


# ---------------------------------------------------------------------------
# the pipeline step
