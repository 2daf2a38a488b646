"""Three CNN families for the 32 px Fashion-MNIST view (3 x 32 x 32), in the patterns of
torchvision's and timm's models, for the benchmarks of CNN merging (docs/benchmarks.md,
"CNN families"):

=============  ================================================================
name           network
=============  ================================================================
mobilenet      conv stem + BatchNorm/hard-swish module (``F.batch_norm``), four
               inverted residuals (expand 1x1, depthwise 3x3, squeeze-
               excitation, project 1x1; hard-swish), a 1x1 head conv and a
               ``Linear`` subclass classifier
convnext       4x4 patchify stem + LayerNorm2d, two stages of two ConvNeXt
               blocks (depthwise 7x7, channels-last LayerNorm, MLP with GELU,
               layer scale) joined by LayerNorm2d + 2x2 strided conv
densenet       conv stem, two dense blocks of four BN-ReLU-conv layers
               concatenating their growth, a BN-ReLU-1x1 transition with
               average pooling
=============  ================================================================

The layers are the suite's (``tests/cnn_nets.py``), whose exact merging properties the
tests check. These are not registry architectures: a merge loads them as a user's own
models (``--model benchmarks/cnn_zoo.py:make --model-args '{"name": "mobilenet"}'``), so
their feature groups come from discovery.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from cnn_nets import (  # noqa: E402
    BatchNormAct2d,
    ConvNeXtBlock,
    DenseLayer,
    LayerNorm2d,
    Linear,
    SqueezeExcite,
)

CLASSES = 10


class MobileBlock(nn.Module):
    """Expand 1x1, depthwise 3x3 (stride 1 or 2), squeeze-excitation, project 1x1; the
    residual when the shape is kept."""

    def __init__(self, cin: int, hidden: int, cout: int, stride: int) -> None:
        super().__init__()
        self.expand = nn.Conv2d(cin, hidden, 1, bias=False)
        self.bn1 = BatchNormAct2d(hidden, nn.Hardswish)
        self.dw = nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False)
        self.bn2 = BatchNormAct2d(hidden, nn.Hardswish)
        self.se = SqueezeExcite(hidden, max(8, hidden // 4))
        self.project = nn.Conv2d(hidden, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn3(self.project(self.se(self.bn2(self.dw(self.bn1(self.expand(x)))))))
        return x + y if self.residual else y


class MobileNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, 2, 1, bias=False)  # 16 x 16
        self.stem_bn = BatchNormAct2d(16, nn.Hardswish)
        self.blocks = nn.Sequential(
            MobileBlock(16, 48, 24, 2),  # 8 x 8
            MobileBlock(24, 72, 24, 1),
            MobileBlock(24, 96, 40, 2),  # 4 x 4
            MobileBlock(40, 120, 40, 1),
        )
        self.head_conv = nn.Conv2d(40, 128, 1, bias=False)
        self.head_bn = BatchNormAct2d(128, nn.Hardswish)
        self.classifier = Linear(128, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head_bn(self.head_conv(self.blocks(self.stem_bn(self.stem(x)))))
        return self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))


class ConvNeXt(nn.Module):
    def __init__(self, widths: tuple[int, int] = (32, 64)) -> None:
        super().__init__()
        a, b = widths
        self.stem = nn.Conv2d(3, a, 4, stride=4)  # 8 x 8
        self.stem_norm = LayerNorm2d(a)
        self.stage1 = nn.Sequential(ConvNeXtBlock(a), ConvNeXtBlock(a))
        self.down_norm = LayerNorm2d(a)
        self.down = nn.Conv2d(a, b, 2, stride=2)  # 4 x 4
        self.stage2 = nn.Sequential(ConvNeXtBlock(b), ConvNeXtBlock(b))
        self.norm = nn.LayerNorm(b)
        self.classifier = Linear(b, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage1(self.stem_norm(self.stem(x)))
        x = self.stage2(self.down(self.down_norm(x)))
        return self.classifier(self.norm(x.mean((2, 3))))


def _dense_block(width: int, growth: int, layers: int) -> nn.Sequential:
    """``layers`` dense layers, each adding ``growth`` channels to its input."""
    return nn.Sequential(*(DenseLayer(width + i * growth, growth) for i in range(layers)))


class DenseNet(nn.Module):
    def __init__(self, stem: int = 24, growth: int = 12, layers: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, stem, 3, padding=1, bias=False)
        self.block1 = _dense_block(stem, growth, layers)
        width = stem + layers * growth
        self.trans_norm = nn.BatchNorm2d(width)
        self.trans = nn.Conv2d(width, width // 2, 1, bias=False)
        self.block2 = _dense_block(width // 2, growth, layers)
        width = width // 2 + layers * growth
        self.norm = nn.BatchNorm2d(width)
        self.classifier = nn.Linear(width, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.stem(x), 2)  # 16 x 16
        x = self.block1(x)
        x = F.avg_pool2d(self.trans(F.relu(self.trans_norm(x))), 2)  # 8 x 8
        x = F.relu(self.norm(self.block2(x)))
        return self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))


NETS: dict[str, type[nn.Module]] = {
    "mobilenet": MobileNet,
    "convnext": ConvNeXt,
    "densenet": DenseNet,
}


def make(name: str) -> nn.Module:
    return NETS[name]()
