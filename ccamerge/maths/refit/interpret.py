"""Executing the plan: one model on one calibration chunk, node by node, and a chunk's
runs of the merged network and of every endpoint with the targets they give."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import fx, nn

from ...runtime.errors import RefitError
from .plan import Fit, Plan, Step, attribute


class Run:
    """``root`` evaluated node by node on one input; a value is dropped after its last
    reader. ``on_value(node, value)`` sees every value as it is computed."""

    def __init__(
        self,
        plan: Plan,
        root: nn.Module,
        x: torch.Tensor,
        on_value: Callable[[fx.Node, Any], None] | None = None,
    ) -> None:
        self.plan, self.root, self.x, self.on_value = plan, root, x, on_value
        self.env: dict[fx.Node, Any] = {}
        self.done = 0  # plan.nodes[:done] have run

    def run_to(self, stop: int) -> None:
        """Run the nodes before position ``stop``."""
        last_read = self.plan.last_read
        while self.done < stop:
            node = self.plan.nodes[self.done]
            value = self._execute(node)
            if self.on_value is not None:
                self.on_value(node, value)
            self.env[node] = value
            for n in (*node.all_input_nodes, node):
                if last_read[n] == self.done:
                    del self.env[n]
            self.done += 1

    def _execute(self, node: fx.Node) -> Any:
        if node.op == "placeholder":
            if node.args:
                return node.args[0]  # an argument's default
            x, self.x = self.x, None  # held from here on (and dropped) like any value
            return x
        if node.op == "get_attr":
            return attribute(self.root, str(node.target))
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), self.env.__getitem__)
        if node.op == "call_module":
            return self.root.get_submodule(str(node.target))(*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            obj, *rest = args
            return getattr(obj, str(node.target))(*rest, **kwargs)
        raise RefitError(f"cannot execute graph node {node.op} {node.target}")


def _map_channels(value: torch.Tensor, M: torch.Tensor | None, dim: int) -> torch.Tensor:
    """``M`` applied to the channel axis ``dim`` of ``value``."""
    if M is None:
        return value
    mapped = torch.tensordot(value, M.to(value), dims=([dim], [1]))
    return torch.movedim(mapped, -1, dim)


def _kept(fit: Fit, value: torch.Tensor, rows_per_sample: float) -> int:
    """How many of the chunk's first samples give ``fit`` rows: all of them, unless a
    sample gives more than ``rows_per_sample`` rows (output positions; 0: no limit)."""
    per_sample = value[:1].numel() // value.shape[fit.channel_dim]
    if rows_per_sample and per_sample > rows_per_sample:
        return math.ceil(value.shape[0] * rows_per_sample / per_sample)
    return value.shape[0]


class EndpointOutputs:
    """The endpoints' outputs at every fit's point, kept from the statistics pass so that
    the refit need not run the endpoints again: per calibration chunk (this rank's share,
    in order), per fit (its index in ``plan.fits``), one tensor per model, the rows the fit
    reads (:func:`_kept`) as the endpoint computed them, before any map.

    :meth:`forward` is the statistics pass's forward of model k on a batch (models in
    order 0..N-1 on each batch); ``routed[node]`` names the modules the plan traces
    through that return that node's value: the statistics pass's output hooks on them
    (marked ``statistics_output``; no other hook) are called with it. When what is kept would exceed ``budget`` bytes (None: no limit),
    everything is dropped and ``dropped`` says why; the refit then runs the endpoints
    again."""

    def __init__(
        self,
        plan: Plan,
        samples: int,
        max_rows: int,
        budget: int | None,
        routed: dict[fx.Node, list[str]] | None = None,
    ) -> None:
        self.plan, self.budget, self.routed = plan, budget, routed or {}
        self.rows_per_sample = max_rows / max(samples, 1)
        self.fits = [fit.name for fit in plan.fits]
        self._index = {fit: i for i, fit in enumerate(plan.fits)}
        self.chunks: list[dict[int, list[torch.Tensor]]] = []
        self.nbytes = 0
        self.dropped: str | None = None

    def forward(self, k: int, model: nn.Module, x: torch.Tensor) -> None:
        if k == 0 and self.dropped is None:
            self.chunks.append({})
        routed = {n: [model.get_submodule(m) for m in ms] for n, ms in self.routed.items()}

        def on_value(node: fx.Node, value: Any) -> None:
            for module in routed.get(node, ()):  # the statistics' output hooks on it
                for hook in list(module._forward_hooks.values()):
                    if getattr(hook, "statistics_output", False):
                        hook(module, (), value)
            self._keep(node, value)

        Run(self.plan, model, x, on_value).run_to(len(self.plan.nodes))

    def _keep(self, node: fx.Node, value: Any) -> None:
        for fit in self.plan.taps.get(node, ()):
            if self.dropped is not None:
                return
            rows = value[: _kept(fit, value, self.rows_per_sample)].clone()
            self.chunks[-1].setdefault(self._index[fit], []).append(rows)
            self.nbytes += rows.numel() * rows.element_size()
            if self.budget is not None and self.nbytes > self.budget:
                self.chunks.clear()
                self.dropped = (
                    f"the endpoints' outputs at the refitted layers need more than the memory "
                    f"budget ({self.budget / 2**30:.2f} GiB): the refit ran the endpoints again"
                )

    def matches(self, plan: Plan, chunks: int, rows_per_sample: float) -> bool:
        """Whether these outputs were kept for ``plan``'s fits, over ``chunks`` chunks, with
        the refit's row limit."""
        same_fits = self.fits == [f.name for f in plan.fits]
        same_rows = self.rows_per_sample == rows_per_sample
        return self.dropped is None and same_fits and same_rows and len(self.chunks) == chunks


class Chunk:
    """One calibration chunk: the merged network's run, and the targets (``sum_k w_k M_k
    z_k`` at each fit's point, on the samples that give the fit rows) of the fits in
    ``wanted``, from every endpoint's run or, given ``kept`` (this chunk's part of an
    :class:`EndpointOutputs`), from the outputs the statistics pass kept."""

    def __init__(
        self,
        plan: Plan,
        merged: nn.Module,
        endpoints: Sequence[nn.Module],
        maps: dict[Fit, list[tuple[float, torch.Tensor | None]]],
        x: torch.Tensor,
        wanted: Iterable[Fit],
        rows_per_sample: float,
        kept: dict[int, list[torch.Tensor]] | None = None,
    ) -> None:
        self.plan, self.maps, self.wanted = plan, maps, set(wanted)
        self.rows_per_sample, self.kept = rows_per_sample, kept
        self.merged = Run(plan, merged, x)
        self.endpoints = []
        if kept is None:
            self.endpoints = [Run(plan, m, x, self._tapper(k)) for k, m in enumerate(endpoints)]
        self.targets: dict[Fit, torch.Tensor] = {}

    def _tapper(self, k: int) -> Callable[[fx.Node, Any], None]:
        def tap(node: fx.Node, value: Any) -> None:
            for fit in self.plan.taps.get(node, ()):
                if fit in self.wanted:
                    self._add(fit, k, value[: _kept(fit, value, self.rows_per_sample)])

        return tap

    def _add(self, fit: Fit, k: int, rows: torch.Tensor) -> None:
        """Model k's part ``w_k M_k z_k`` of ``fit``'s target."""
        w, M = self.maps[fit][k]
        if w:
            part = w * _map_channels(rows, M, fit.channel_dim)
            self.targets[fit] = self.targets[fit] + part if fit in self.targets else part

    def advance(self, step: Step) -> None:
        """Run the merged network up to ``step``'s node, the endpoints through its point."""
        position = self.plan.position
        self.merged.run_to(position[step.node])
        if isinstance(step, Fit):
            for run in self.endpoints:
                run.run_to(position[step.point] + 1)

    def input_of(self, step: Step) -> torch.Tensor:
        return self.merged.env[step.node.args[0]]

    def target_of(self, fit: Fit) -> torch.Tensor:
        if self.kept is not None:  # read once: freed as it is used
            for k, rows in enumerate(self.kept.pop(self.plan.fits.index(fit))):
                self._add(fit, k, rows)
        target = self.targets.pop(fit)
        if fit.other is None:
            return target
        return target - self.merged.env[fit.other][: target.shape[0]]


# ---------------------------------------------------------------------------
# the normal equations
