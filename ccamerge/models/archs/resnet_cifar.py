"""CIFAR-style ResNets (ResNet20/32/44/56/110, any width multiplier).

The layout (He et al. 2016, section 4.2, with a convolution shortcut, "option
B"), as saved by ``torch.save(model.state_dict())``::

    conv1.weight                          3x3 stem conv, stride 1, padding 1, no bias
    bn1.*                                 its BatchNorm
    layer{s}.{j}.conv1.weight, bn1.*      3x3 conv (stride 2 in block 0 of stages s >= 2)
    layer{s}.{j}.conv2.weight, bn2.*      3x3 conv, stride 1
    layer{s}.{j}.shortcut.0.weight        shortcut conv where the shape changes
                                          (kernel 1x1 or 3x3, padding k//2, the block's stride)
    layer{s}.{j}.shortcut.1.*             its BatchNorm
    linear.weight / .bias                 the head

Block: ``out = relu(bn1(conv1(x))); out = bn2(conv2(out)); out += shortcut(x);
relu(out)``; then global average pooling and ``linear``. Depth (6n+2), the
stage widths (16w, 32w, 64w for width multiplier w), the number of stages,
the shortcut kernels and the class count are all read from shapes. Four-stage
CIFAR ResNet18/34 checkpoints in the same naming (BasicBlocks, ``shortcut``,
``linear``) fit too. Blocks are BasicBlocks (two 3x3 convs); bottleneck blocks
are not supported in this layout.

The zero-padding identity shortcut ("option A": no shortcut parameters where
the channel count changes) is not supported: detection raises
:class:`~ccamerge.runtime.errors.ArchitectureError` saying so.

Input size: CIFAR's is ``in_channels x 32 x 32``, but the global average pool
makes the network accept any spatial size, so ``input_shape`` is None (the
merge pipeline then checks the data with a trial forward pass).

The pieces shared with the torchvision layout (:class:`ResidualBlock`, block
parsing, the residual spec builder) live in :mod:`ccamerge.models.archs.residual`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ...runtime.errors import ArchitectureError
from ..registry import NotThisArchitecture, register_architecture
from ..spec import MergeSpec
from .common import check_fits
from .residual import (
    MissingShortcut,
    check_head,
    check_stem,
    make_stages,
    parse_blocks,
    residual_spec,
    stage_summary,
)

# --------------------------------------------------------------------------
# shared residual machinery (also used by resnet_tv)


# --------------------------------------------------------------------------
# the CIFAR layout


def cifar_resnet_config(
    depth: int = 20,
    width: int = 1,
    shortcut_kernel: int = 1,
    num_classes: int = 10,
    in_channels: int = 3,
    base: int = 16,
    num_stages: int = 3,
) -> dict[str, Any]:
    """The config that :meth:`CifarResNetArchitecture.detect` returns for a
    ResNet{depth} (depth = 6n + 2 for 3 stages) with stage widths
    ``base*width * (1, 2, 4, ...)``."""
    if (depth - 2) % (2 * num_stages):
        raise ValueError(f"depth {depth} is not 2 * {num_stages} * n + 2")
    n = (depth - 2) // (2 * num_stages)
    widths = [base * width * 2**s for s in range(num_stages)]
    blocks = []
    c = base * width
    for s, w in enumerate(widths, start=1):
        for j in range(n):
            stride = 2 if (s > 1 and j == 0) else 1
            blocks.append(
                {
                    "name": f"layer{s}.{j}",
                    "channels": [c, w, w],
                    "kernels": [3, 3],
                    "stride": stride,
                    "shortcut": shortcut_kernel if (c != w or stride != 1) else None,
                }
            )
            c = w
    return _cifar_config(in_channels, base * width, num_classes, blocks)


def _cifar_config(
    in_channels: int, stem_width: int, num_classes: int, blocks: list[dict[str, Any]]
) -> dict[str, Any]:
    stages, widths = stage_summary(blocks)
    return {
        "in_channels": int(in_channels),
        "stem_width": int(stem_width),
        "num_classes": int(num_classes),
        "depth": 2 * len(blocks) + 2,
        "stages": stages,
        "widths": widths,
        "blocks": blocks,
    }


class CifarResNet(nn.Module):
    """``conv1, bn1, relu, layer1..layerS, global average pool, linear``."""

    def __init__(
        self,
        blocks: Sequence[Mapping[str, Any]],
        stem_width: int,
        num_classes: int = 10,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, stem_width, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU()
        self.stage_names: list[str] = []
        for name, stage in make_stages(blocks, "shortcut"):
            setattr(self, name, stage)
            self.stage_names.append(name)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        last = int(blocks[-1]["channels"][-1]) if blocks else stem_width
        self.linear = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return self.linear(self.avgpool(x).flatten(1))


_CIFAR_KEY = re.compile(
    r"^(conv1\.weight|bn1\.\w+|linear\.(weight|bias)"
    r"|layer\d+\.\d+\.(conv[12]\.weight|bn[12]\.\w+|shortcut\.0\.weight|shortcut\.1\.\w+))$"
)


def _share(keys: list[str], pattern: re.Pattern[str]) -> float:
    return sum(bool(pattern.match(k)) for k in keys) / len(keys) if keys else 0.0


@register_architecture
class CifarResNetArchitecture:
    name = "resnet_cifar"
    description = (
        "CIFAR-style ResNet (ResNet20/32/44/56..., any width; 3x3 stem, "
        "conv shortcuts, 'linear' head)"
    )

    def detect(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        keys = list(state_dict)
        score = _share(keys, _CIFAR_KEY)
        if "fc.weight" in state_dict and "linear.weight" not in state_dict:
            raise NotThisArchitecture("the head is 'fc', not 'linear' (torchvision layout?)", score)
        if any(".downsample." in k for k in keys):
            raise NotThisArchitecture(
                "shortcuts are named 'downsample' (torchvision layout?), not 'shortcut'", score
            )
        stem_width, in_channels = check_stem(state_dict, 3, "CIFAR", score)
        if any(re.match(r"^layer\d+\.\d+\.conv3\.", k) for k in keys):
            raise NotThisArchitecture(
                "bottleneck blocks (conv3) are not supported in the CIFAR layout", score
            )
        try:
            blocks = parse_blocks(state_dict, "shortcut", stem_width, score)
        except MissingShortcut as e:
            change = (
                f"changes channels {e.c_in} -> {e.c_out}"
                if e.c_in != e.c_out
                else f"has stride {e.stride}"
            )
            raise ArchitectureError(
                f"CIFAR ResNet block {e.block} {change} but has no shortcut parameters: "
                "the zero-padding identity shortcut ('option A') is not supported; "
                "use a model trained with a convolution shortcut ('option B')"
            ) from None
        for blk in blocks:
            if blk["kernels"] != [3, 3]:
                raise NotThisArchitecture(
                    f"{blk['name']} has kernels {blk['kernels']}; CIFAR BasicBlocks have [3, 3]",
                    score,
                )
        num_classes = check_head(state_dict, "linear", blocks[-1]["channels"][-1], score)
        config = _cifar_config(in_channels, stem_width, num_classes, blocks)
        check_fits(state_dict, self.build, config, score)
        return config

    def build(self, config: Mapping[str, Any]) -> nn.Module:
        return CifarResNet(
            config["blocks"],
            int(config["stem_width"]),
            num_classes=int(config["num_classes"]),
            in_channels=int(config.get("in_channels", 3)),
        )

    def spec(self, config: Mapping[str, Any]) -> MergeSpec:
        """Groups ``stream{i}`` and ``layer{s}.{j}.conv1`` (see :func:`residual_spec`).

        A stream that only the stem writes is collected at the stem's ``relu``.
        """
        return residual_spec(
            int(config["stem_width"]), config["blocks"], "shortcut", "linear", ("relu", "output")
        )

    def input_shape(self, config: Mapping[str, Any]) -> None:
        """None: any spatial size works (global average pool); CIFAR's is 32x32.
        The channel count is ``config["in_channels"]``."""
        return None

    def example_input_shape(self, config: Mapping[str, Any]) -> tuple[int, ...]:
        """A small input for tests (the network takes any spatial size)."""
        return (int(config.get("in_channels", 3)), 16, 16)

    def example_config(self) -> dict[str, Any]:
        # ResNet14-like with base width 4: a 1x1 shortcut at layer2.0, a 3x3 one at
        # layer3.0, and a stem wider than layer1 so that layer1.0 has a shortcut too
        # (then stream0 is written by the stem only); layer1.1 has a hidden width of 5.
        config = cifar_resnet_config(depth=14, width=1, base=4, num_classes=5)
        blocks = config["blocks"]
        blocks[0]["channels"] = [6, 4, 4]
        blocks[0]["shortcut"] = 1
        blocks[1]["channels"] = [4, 5, 4]  # a hidden width that differs from the stream's
        blocks[2]["shortcut"] = 1
        blocks[4]["shortcut"] = 3
        return _cifar_config(3, 6, 5, blocks)
