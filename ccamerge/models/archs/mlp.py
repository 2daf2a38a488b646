"""MLPs: a stack of Linear layers with an activation (ReLU unless told) between them.

Two layouts are detected from tensor names alone:

* ``sequential``: a plain ``nn.Sequential`` saved as ``0.weight, 0.bias,
  2.weight, ...`` (the indices between Linear layers hold ReLU, Dropout or
  other parameter-free modules; the first gap holds a ReLU);
* ``ccamerge``: this package's :class:`MLP`, saved as ``layers.{i}.weight``.

Inputs are flattened, so (B, 1, 28, 28) images feed a 784-wide MLP.

A state dict does not record the activation: the entry assumes ReLU and says
so (``assumptions``); ``--activation`` states another one.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..registry import NotThisArchitecture, register_architecture
from ..spec import MergeSpec, SpecBuilder

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "sigmoid": nn.Sigmoid,
    "silu": nn.SiLU,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
}


class MLP(nn.Module):
    """``sizes = [in, h1, ..., out]``: Linear layers with ``activation`` between them."""

    def __init__(self, sizes: list[int], bias: bool = True, activation: str = "relu") -> None:
        super().__init__()
        if len(sizes) < 2:
            raise ValueError("an MLP needs at least input and output sizes")
        self.sizes = list(sizes)
        self.layers = nn.ModuleList(
            nn.Linear(a, b, bias=bias) for a, b in zip(sizes[:-1], sizes[1:])
        )
        self.act = ACTIVATIONS[activation]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = self.act(x)
        return x


class SequentialMLP(nn.Sequential):
    """An ``nn.Sequential`` MLP that flattens its input first."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x.flatten(1))


_SEQ = re.compile(r"^(\d+)\.(weight|bias)$")
_OWN = re.compile(r"^layers\.(\d+)\.(weight|bias)$")


@register_architecture
class MLPArchitecture:
    name = "mlp"
    description = (
        "Linear layers with an activation between them (nn.Sequential or ccamerge.MLP layout)"
    )
    # what a state dict does not record: option -> choices, the assumed default first
    assumptions = {"activation": tuple(ACTIVATIONS)}

    def detect(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        keys = list(state_dict)
        if not keys:
            raise NotThisArchitecture("the checkpoint has no tensors")
        for layout, pattern in (("ccamerge", _OWN), ("sequential", _SEQ)):
            matches = [pattern.match(k) for k in keys]
            hits = sum(m is not None for m in matches)
            if hits == 0:
                continue
            if hits < len(keys):
                odd = next(k for k, m in zip(keys, matches) if m is None)
                raise NotThisArchitecture(
                    f"tensor {odd!r} is not a Linear weight or bias", hits / len(keys)
                )
            indices = sorted({int(m.group(1)) for m in matches if m})
            return self._chain(state_dict, layout, indices, hits / len(keys))
        raise NotThisArchitecture("no tensor named like '0.weight' or 'layers.0.weight'")

    @staticmethod
    def _chain(sd: Mapping[str, torch.Tensor], layout: str, indices: list[int], score: float):
        prefix = "layers." if layout == "ccamerge" else ""
        sizes: list[int] = []
        has_bias = None
        for idx in indices:
            w = sd.get(f"{prefix}{idx}.weight")
            if w is None or w.ndim != 2:
                raise NotThisArchitecture(f"{prefix}{idx}.weight is missing or not 2-D", score)
            bias = f"{prefix}{idx}.bias" in sd
            if has_bias is None:
                has_bias = bias
            elif bias != has_bias:
                raise NotThisArchitecture("some Linear layers have a bias and others not", score)
            if bias and tuple(sd[f"{prefix}{idx}.bias"].shape) != (w.shape[0],):
                raise NotThisArchitecture(f"{prefix}{idx}.bias does not fit its weight", score)
            out_f, in_f = w.shape
            if sizes and sizes[-1] != in_f:
                raise NotThisArchitecture(
                    f"{prefix}{idx}.weight takes {in_f} inputs but the layer before gives {sizes[-1]}",
                    score,
                )
            if not sizes:
                sizes.append(int(in_f))
            sizes.append(int(out_f))
        if layout == "ccamerge" and indices != list(range(len(indices))):
            raise NotThisArchitecture("layers.{i} indices are not 0, 1, 2, ...", score)
        if layout == "sequential" and any(b - a < 2 for a, b in zip(indices, indices[1:])):
            raise NotThisArchitecture("two Linear layers with no ReLU slot between them", score)
        return {
            "layout": layout,
            "indices": indices,
            "sizes": sizes,
            "bias": bool(has_bias),
            "activation": "relu",
        }

    def build(self, config: Mapping[str, Any]) -> nn.Module:
        sizes, bias = list(config["sizes"]), bool(config.get("bias", True))
        activation = config.get("activation", "relu")
        if config["layout"] == "ccamerge":
            return MLP(sizes, bias=bias, activation=activation)
        indices = list(config["indices"])
        modules: list[nn.Module] = [nn.Identity() for _ in range(indices[-1] + 1)]
        for j, idx in enumerate(indices):
            modules[idx] = nn.Linear(sizes[j], sizes[j + 1], bias=bias)
            if j + 1 < len(indices):
                modules[idx + 1] = ACTIVATIONS[activation]()
        return SequentialMLP(*modules)

    def spec(self, config: Mapping[str, Any]) -> MergeSpec:
        sizes, bias = config["sizes"], bool(config.get("bias", True))
        if config["layout"] == "ccamerge":
            names = [f"layers.{i}" for i in range(len(sizes) - 1)]
        else:
            names = [str(i) for i in config["indices"]]
        b = SpecBuilder()
        for j in range(len(names) - 1):
            group = f"hidden{j}"
            b.writes(group, sizes[j + 1], names[j], bias=bias)
            b.reads(group, sizes[j + 1], names[j + 1])
            b.collect(group, names[j + 1], on="input")
        return b.build()

    def input_shape(self, config: Mapping[str, Any]) -> tuple[int, ...]:
        return (int(config["sizes"][0]),)

    def example_config(self) -> dict[str, Any]:
        """A tiny configuration for the registry's generic tests."""
        return {
            "layout": "ccamerge",
            "indices": [0, 1, 2],
            "sizes": [12, 8, 6, 5],
            "bias": True,
            "activation": "relu",
        }
