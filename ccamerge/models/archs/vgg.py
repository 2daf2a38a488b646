"""CIFAR-style VGG (the pytorch-cifar layout), with or without BatchNorm.

The layout, as saved by ``torch.save(model.state_dict())``::

    features.{i}.weight / .bias          3x3 conv, padding 1
    features.{i+1}.weight / .bias /      BatchNorm2d (only with BN)
        .running_mean / .running_var / .num_batches_tracked
    features.{i+2 or i+1}                ReLU (no tensors)
    features.{...}                       2x2 max-pools between stages (no tensors)
    ...                                  a final 2x2 max-pool and a 1x1 AvgPool (no-ops)
    classifier.weight / .bias            one Linear: last conv's channels -> classes

Everything is read from tensor names and shapes: the conv list and widths
(any depth, any width multiplier), BatchNorm or not, conv bias or not, and
where the max-pools fall (a gap of more than conv+(BN)+ReLU slots between two
conv indices holds one max-pool per extra slot). The network ends with one
max-pool after the last conv (pytorch-cifar's configurations all end in
``'M'``), then the 1x1 average pool.

Input size: only networks whose last feature map is 1x1 are supported, i.e.
``classifier.in_features`` must equal the last conv's channel count (then the
flatten before the classifier is the identity on channels and the classifier's
input axis is exactly the last conv's feature group). With P max-pools in all
(P = 5 for VGG11/13/16/19) the nominal input is ``in_channels x 2^P x 2^P``
(3x32x32); any side between 2^P and 2^(P+1)-1 (32..63) also ends at 1x1 and
works. A checkpoint whose classifier reads a larger C*H*W flatten is refused.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..registry import NotThisArchitecture, register_architecture
from ..spec import MergeSpec, SpecBuilder
from .common import check_fits

_FEATURE = re.compile(
    r"^features\.(\d+)\.(weight|bias|running_mean|running_var|num_batches_tracked)$"
)
_HEAD = re.compile(r"^classifier\.(weight|bias)$")
_BN_KEYS = ("weight", "bias", "running_mean", "running_var")


def _layer_plan(cfg: list[Any], batch_norm: bool) -> list[tuple[str, int]]:
    """``cfg`` -> list of (kind, channels) per ``features`` index.

    kinds: ``conv``, ``bn``, ``relu``, ``maxpool``, ``avgpool``; the index in the
    list is the module's index in ``features``.
    """
    plan: list[tuple[str, int]] = []
    for item in cfg:
        if item == "M":
            plan.append(("maxpool", 0))
        else:
            c = int(item)
            plan.append(("conv", c))
            if batch_norm:
                plan.append(("bn", c))
            plan.append(("relu", c))
    plan.append(("avgpool", 0))
    return plan


def vgg_config(
    convs_per_stage: tuple[int, ...] = (1, 1, 2, 2, 2),
    widths: tuple[int, ...] = (64, 128, 256, 512, 512),
    batch_norm: bool = True,
    num_classes: int = 10,
    in_channels: int = 3,
    conv_bias: bool = True,
) -> dict[str, Any]:
    """The config that :meth:`VGGArchitecture.detect` returns for a pytorch-cifar VGG.

    The defaults are VGG11 (VGG13: ``(2, 2, 2, 2, 2)``, VGG16: ``(2, 2, 3, 3, 3)``,
    VGG19: ``(2, 2, 4, 4, 4)``); a width multiplier scales ``widths``.
    """
    cfg: list[Any] = []
    for n, w in zip(convs_per_stage, widths):
        cfg += [int(w)] * n + ["M"]
    return {
        "in_channels": int(in_channels),
        "cfg": cfg,
        "batch_norm": bool(batch_norm),
        "conv_bias": bool(conv_bias),
        "num_classes": int(num_classes),
        "depth": sum(convs_per_stage) + 3,
    }


class VGG(nn.Module):
    """pytorch-cifar's VGG: ``features`` (an ``nn.Sequential``), flatten, ``classifier``.

    ``cfg`` lists conv widths and ``'M'`` for 2x2 max-pools, e.g. VGG11's
    ``[64, 'M', 128, 'M', 256, 256, 'M', 512, 512, 'M', 512, 512, 'M']``.
    ReLUs are not in-place, so forward hooks on a BatchNorm see its own output.
    """

    def __init__(
        self,
        cfg: list[Any],
        batch_norm: bool = True,
        num_classes: int = 10,
        in_channels: int = 3,
        conv_bias: bool = True,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for kind, c in _layer_plan(cfg, batch_norm):
            if kind == "conv":
                layers.append(nn.Conv2d(c_in, c, kernel_size=3, padding=1, bias=conv_bias))
                c_in = c
            elif kind == "bn":
                layers.append(nn.BatchNorm2d(c))
            elif kind == "relu":
                layers.append(nn.ReLU())
            elif kind == "maxpool":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers.append(nn.AvgPool2d(kernel_size=1, stride=1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def _share(keys: list[str]) -> float:
    if not keys:
        return 0.0
    return sum(bool(_FEATURE.match(k) or _HEAD.match(k)) for k in keys) / len(keys)


@register_architecture
class VGGArchitecture:
    name = "vgg"
    description = "CIFAR-style VGG (pytorch-cifar layout: features.{i}, classifier), BN optional"

    def detect(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        keys = list(state_dict)
        score = _share(keys)
        if not any(_FEATURE.match(k) for k in keys):
            raise NotThisArchitecture("no tensor named like 'features.{i}.weight'", score)
        odd = [k for k in keys if not (_FEATURE.match(k) or _HEAD.match(k))]
        if odd:
            raise NotThisArchitecture(
                f"tensor {odd[0]!r} is not part of a VGG's 'features' or 'classifier'", score
            )
        if "classifier.weight" not in state_dict:
            raise NotThisArchitecture(
                "no 'classifier.weight': the classifier must be one Linear layer", score
            )

        def shape(k: str) -> tuple[int, ...]:
            return tuple(state_dict[k].shape)

        indices = sorted({int(m.group(1)) for k in keys if (m := _FEATURE.match(k))})
        convs, bns = [], []
        for i in indices:
            w = f"features.{i}.weight"
            if w not in state_dict:
                raise NotThisArchitecture(f"features.{i} has tensors but no weight", score)
            if len(shape(w)) == 4:
                convs.append(i)
            elif len(shape(w)) == 1 and f"features.{i}.running_mean" in state_dict:
                bns.append(i)
            else:
                raise NotThisArchitecture(
                    f"{w} has shape {shape(w)}: neither a conv nor a BatchNorm", score
                )
        if not convs:
            raise NotThisArchitecture("'features' holds no convolution", score)
        if convs[0] != 0:
            raise NotThisArchitecture("the first conv is not features.0", score)
        batch_norm = bool(bns)
        if batch_norm and bns != [i + 1 for i in convs]:
            raise NotThisArchitecture(
                "BatchNorm layers do not sit right after every conv "
                f"(convs at {convs}, BatchNorms at {bns})",
                score,
            )
        conv_bias = f"features.{convs[0]}.bias" in state_dict
        cfg: list[Any] = []
        slots = 3 if batch_norm else 2
        c_in = shape(f"features.{convs[0]}.weight")[1]
        in_channels = c_in
        for n, i in enumerate(convs):
            w = f"features.{i}.weight"
            out_c, got_in, kh, kw = shape(w)
            if (kh, kw) != (3, 3):
                raise NotThisArchitecture(f"{w} has a {kh}x{kw} kernel; a VGG's are 3x3", score)
            if got_in != c_in:
                raise NotThisArchitecture(
                    f"{w} takes {got_in} channels but the layer before gives {c_in}", score
                )
            if (f"features.{i}.bias" in state_dict) != conv_bias:
                raise NotThisArchitecture("some convs have a bias and others not", score)
            if batch_norm:
                for p in _BN_KEYS:
                    k = f"features.{i + 1}.{p}"
                    if k not in state_dict or shape(k) != (out_c,):
                        raise NotThisArchitecture(f"{k} is missing or not of size {out_c}", score)
            cfg.append(int(out_c))
            if n + 1 < len(convs):
                pools = convs[n + 1] - i - slots
                if pools < 0:
                    raise NotThisArchitecture(
                        f"features.{i} and features.{convs[n + 1]} leave no slot for a ReLU",
                        score,
                    )
                cfg += ["M"] * pools
            c_in = out_c
        cfg.append("M")
        head = shape("classifier.weight")
        if len(head) != 2:
            raise NotThisArchitecture(f"classifier.weight has shape {head}, not 2-D", score)
        if head[1] != c_in:
            raise NotThisArchitecture(
                f"classifier takes {head[1]} inputs but the last conv has {c_in} channels: "
                "only VGGs whose last feature map is 1x1 are supported",
                score,
            )
        if "classifier.bias" not in state_dict:
            raise NotThisArchitecture("classifier.bias is missing", score)
        if shape("classifier.bias") != (head[0],):
            raise NotThisArchitecture("classifier.bias does not fit classifier.weight", score)
        config = {
            "in_channels": int(in_channels),
            "cfg": cfg,
            "batch_norm": batch_norm,
            "conv_bias": conv_bias,
            "num_classes": int(head[0]),
            "depth": len(convs) + 3,
        }
        check_fits(state_dict, self.build, config, score)
        return config

    def build(self, config: Mapping[str, Any]) -> nn.Module:
        return VGG(
            list(config["cfg"]),
            batch_norm=bool(config["batch_norm"]),
            num_classes=int(config["num_classes"]),
            in_channels=int(config.get("in_channels", 3)),
            conv_bias=bool(config.get("conv_bias", True)),
        )

    def spec(self, config: Mapping[str, Any]) -> MergeSpec:
        """One group per conv, named after it (``features.{i}``).

        Members: the conv's output axis (weight, bias), its BatchNorm, and the
        input axis of the next conv or of the classifier. Collected at the
        output of the conv's ReLU (``features.{j}``, post-BN, post-ReLU, before
        any max-pool): that is the group's own activation at full resolution.
        A max-pool after it only drops samples (it commutes with permutations
        but not with a dense CCA map), so reading after the pool, at the next
        conv's input, would fit the alignment to a biased subset of positions.
        """
        batch_norm = bool(config["batch_norm"])
        bias = bool(config.get("conv_bias", True))
        plan = _layer_plan(list(config["cfg"]), batch_norm)
        conv_idx = [i for i, (kind, _) in enumerate(plan) if kind == "conv"]
        b = SpecBuilder()
        for n, i in enumerate(conv_idx):
            c = plan[i][1]
            group = f"features.{i}"
            b.writes(group, c, f"features.{i}", bias=bias)
            if batch_norm:
                b.norm(group, c, f"features.{i + 1}")
            relu = i + (2 if batch_norm else 1)
            b.collect(group, f"features.{relu}", on="output")
            nxt = f"features.{conv_idx[n + 1]}" if n + 1 < len(conv_idx) else "classifier"
            b.reads(group, c, nxt)
        return b.build()

    def input_shape(self, config: Mapping[str, Any]) -> tuple[int, ...]:
        side = 2 ** sum(1 for item in config["cfg"] if item == "M")
        return (int(config.get("in_channels", 3)), side, side)

    def example_config(self) -> dict[str, Any]:
        return vgg_config((1, 1, 2), (4, 6, 8), batch_norm=True, num_classes=5)
