"""torchvision-layout ResNets: ResNet-18/34 (BasicBlock), ResNet-50/101/152 (Bottleneck).

The layout of ``torchvision.models.resnet*().state_dict()``::

    conv1.weight                          7x7 stem conv, stride 2, padding 3, no bias
    bn1.*                                 its BatchNorm (then ReLU, 3x3/2 max-pool, padding 1)
    layer{s}.{j}.conv1/bn1, conv2/bn2     BasicBlock: two 3x3 convs
    layer{s}.{j}.conv1/bn1 .. conv3/bn3   Bottleneck: 1x1, 3x3, 1x1 convs
    layer{s}.{j}.downsample.0.weight      1x1 shortcut conv where the shape changes
    layer{s}.{j}.downsample.1.*           its BatchNorm
    fc.weight / .bias                     the head, after global average pooling

Stride 2 sits in block 0 of stages 2, 3, 4, on its first 3x3 conv (conv1 of a
BasicBlock, conv2 of a Bottleneck: torchvision's "ResNet v1.5") and on its
downsample conv. The block type (conv3 present or not), the number of blocks
per stage, every width (so wide_resnet50_2 and narrower variants too) and the
class count are read from shapes. Grouped convolutions (ResNeXt) and dilation
are not supported.

Input size: ImageNet's is ``in_channels x 224 x 224``, but the adaptive
average pool makes the network accept any spatial size (torchvision ResNets
fine-tuned on 32x32 images are common), so ``input_shape`` is None.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

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

_TV_KEY = re.compile(
    r"^(conv1\.weight|bn1\.\w+|fc\.(weight|bias)"
    r"|layer\d+\.\d+\.(conv[123]\.weight|bn[123]\.\w+|downsample\.0\.weight|downsample\.1\.\w+))$"
)

_STANDARD_LAYERS = {
    ("basic", (2, 2, 2, 2)): 18,
    ("basic", (3, 4, 6, 3)): 34,
    ("bottleneck", (3, 4, 6, 3)): 50,
    ("bottleneck", (3, 4, 23, 3)): 101,
    ("bottleneck", (3, 8, 36, 3)): 152,
}


def tv_resnet_config(
    depth: int = 18,
    widths: Sequence[int] = (64, 128, 256, 512),
    stem_width: int | None = None,
    num_classes: int = 1000,
    in_channels: int = 3,
    expansion: int = 4,
    width_per_group: int = 64,
) -> dict[str, Any]:
    """The config that :meth:`TorchvisionResNetArchitecture.detect` returns for
    torchvision's ``resnet{depth}`` with ``planes`` per stage ``widths`` (the
    block's inner width; a Bottleneck's output is ``expansion * planes``) and
    the stem ``stem_width`` (default ``widths[0]``). A Bottleneck's inner width
    is ``planes * width_per_group // 64`` (128 for wide_resnet50_2)."""
    by_depth = {d: (kind, layers) for (kind, layers), d in _STANDARD_LAYERS.items()}
    if depth not in by_depth:
        raise ValueError(f"no standard torchvision ResNet of depth {depth}")
    kind, layers = by_depth[depth]
    stem = c = int(stem_width if stem_width is not None else widths[0])
    blocks = []
    for s, (n, planes) in enumerate(zip(layers, widths), start=1):
        for j in range(n):
            stride = 2 if (s > 1 and j == 0) else 1
            if kind == "basic":
                channels, kernels = [c, planes, planes], [3, 3]
            else:
                mid = planes * width_per_group // 64
                channels, kernels = [c, mid, mid, planes * expansion], [1, 3, 1]
            out = channels[-1]
            blocks.append(
                {
                    "name": f"layer{s}.{j}",
                    "channels": channels,
                    "kernels": kernels,
                    "stride": stride,
                    "shortcut": 1 if (c != out or stride != 1) else None,
                }
            )
            c = out
    return _tv_config(in_channels, stem, num_classes, kind, blocks)


def _tv_config(
    in_channels: int, stem_width: int, num_classes: int, block: str, blocks: list[dict[str, Any]]
) -> dict[str, Any]:
    stages, widths = stage_summary(blocks)
    per_block = 2 if block == "basic" else 3
    return {
        "in_channels": int(in_channels),
        "stem_width": int(stem_width),
        "num_classes": int(num_classes),
        "block": block,
        "depth": per_block * len(blocks) + 2,
        "stages": stages,
        "widths": widths,
        "blocks": blocks,
    }


class TorchvisionResNet(nn.Module):
    """``conv1, bn1, relu, maxpool, layer1..layerS, avgpool, flatten, fc``."""

    def __init__(
        self,
        blocks: Sequence[Mapping[str, Any]],
        stem_width: int,
        num_classes: int = 1000,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(
            in_channels, stem_width, kernel_size=7, stride=2, padding=3, bias=False
        )
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.stage_names: list[str] = []
        for name, stage in make_stages(blocks, "downsample"):
            setattr(self, name, stage)
            self.stage_names.append(name)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        last = int(blocks[-1]["channels"][-1]) if blocks else stem_width
        self.fc = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register_architecture
class TorchvisionResNetArchitecture:
    name = "resnet"
    description = (
        "torchvision-layout ResNet-18/34/50/101/152 and wide variants "
        "(7x7 stem, max-pool, 'downsample' shortcuts, 'fc' head)"
    )

    def detect(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        keys = list(state_dict)
        score = sum(bool(_TV_KEY.match(k)) for k in keys) / len(keys) if keys else 0.0
        if "linear.weight" in state_dict and "fc.weight" not in state_dict:
            raise NotThisArchitecture("the head is 'linear', not 'fc' (CIFAR layout?)", score)
        if any(".shortcut." in k for k in keys):
            raise NotThisArchitecture(
                "shortcuts are named 'shortcut' (CIFAR layout?), not 'downsample'", score
            )
        stem_width, in_channels = check_stem(state_dict, 7, "torchvision", score)
        try:
            blocks = parse_blocks(state_dict, "downsample", stem_width, score)
        except MissingShortcut as e:
            raise NotThisArchitecture(
                f"{e.block} changes shape ({e.c_in} -> {e.c_out} channels, stride {e.stride}) "
                "but has no downsample",
                score,
            ) from None
        kinds = {tuple(blk["kernels"]) for blk in blocks}
        if kinds == {(3, 3)}:
            block = "basic"
        elif kinds == {(1, 3, 1)}:
            block = "bottleneck"
        else:
            raise NotThisArchitecture(
                f"block kernels {sorted(kinds)}: expected all BasicBlocks (3, 3) "
                "or all Bottlenecks (1, 3, 1)",
                score,
            )
        for blk in blocks:
            if blk["shortcut"] not in (None, 1):
                raise NotThisArchitecture(
                    f"{blk['name']}.downsample.0 has a {blk['shortcut']}x{blk['shortcut']} "
                    "kernel; torchvision's is 1x1",
                    score,
                )
        num_classes = check_head(state_dict, "fc", blocks[-1]["channels"][-1], score)
        config = _tv_config(in_channels, stem_width, num_classes, block, blocks)
        check_fits(state_dict, self.build, config, score)
        return config

    def build(self, config: Mapping[str, Any]) -> nn.Module:
        return TorchvisionResNet(
            config["blocks"],
            int(config["stem_width"]),
            num_classes=int(config["num_classes"]),
            in_channels=int(config.get("in_channels", 3)),
        )

    def spec(self, config: Mapping[str, Any]) -> MergeSpec:
        """Groups ``stream{i}``, ``layer{s}.{j}.conv1`` and (Bottleneck)
        ``layer{s}.{j}.conv2`` (see :func:`~ccamerge.models.archs.resnet_cifar.residual_spec`).

        A stream that only the stem writes (ResNet-50's 64-wide stem stream:
        ``layer1.0`` has a downsample) is collected at the stem's ``relu``
        output, before the max-pool, at full resolution.
        """
        return residual_spec(
            int(config["stem_width"]), config["blocks"], "downsample", "fc", ("relu", "output")
        )

    def input_shape(self, config: Mapping[str, Any]) -> None:
        """None: any spatial size works (adaptive average pool); 224x224 is the
        ImageNet size, but models fine-tuned on 32x32 images are common. The
        channel count is ``config["in_channels"]``."""
        return None

    def example_input_shape(self, config: Mapping[str, Any]) -> tuple[int, ...]:
        """A small input for tests (the network takes any spatial size)."""
        return (int(config.get("in_channels", 3)), 64, 64)

    def example_config(self) -> dict[str, Any]:
        # ResNet-50's block structure with tiny widths; the stem (4) differs from
        # layer1's output (2 * 4 = 8), so layer1.0 has a downsample, as in ResNet-50
        return tv_resnet_config(50, widths=(2, 3, 4, 5), stem_width=4, num_classes=7)
