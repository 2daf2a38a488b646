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


class Chunk:
    """One calibration chunk: the merged network's run, every endpoint's run, and the
    targets (``sum_k w_k M_k z_k`` at each fit's point, on the samples that give the fit
    rows) of the fits in ``wanted``."""

    def __init__(
        self,
        plan: Plan,
        merged: nn.Module,
        endpoints: Sequence[nn.Module],
        maps: dict[Fit, list[tuple[float, torch.Tensor | None]]],
        x: torch.Tensor,
        wanted: Iterable[Fit],
        rows_per_sample: float,
    ) -> None:
        self.plan, self.maps, self.wanted = plan, maps, set(wanted)
        self.rows_per_sample = rows_per_sample
        self.merged = Run(plan, merged, x)
        self.endpoints = [Run(plan, m, x, self._tapper(k)) for k, m in enumerate(endpoints)]
        self.targets: dict[Fit, torch.Tensor] = {}

    def _tapper(self, k: int) -> Callable[[fx.Node, Any], None]:
        def tap(node: fx.Node, value: Any) -> None:
            for fit in self.plan.taps.get(node, ()):
                w, M = self.maps[fit][k]
                if fit in self.wanted and w:
                    rows = value[: _kept(fit, value, self.rows_per_sample)]
                    part = w * _map_channels(rows, M, fit.channel_dim)
                    self.targets[fit] = self.targets[fit] + part if fit in self.targets else part

        return tap

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
        target = self.targets.pop(fit)
        if fit.other is None:
            return target
        return target - self.merged.env[fit.other][: target.shape[0]]


# ---------------------------------------------------------------------------
# the normal equations
