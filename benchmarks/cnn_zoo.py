"""Small CNNs of three families for the 32 px Fashion-MNIST view (``cifar``: 3 x 32 x 32),
written for the benchmarks of CNN merging (issue 24, item 5; docs/benchmarks.md):

=============  ================================================================
name           network
=============  ================================================================
mobilenet      stem, inverted residuals (expand 1x1, depthwise 3x3, squeeze-
               excitation, project 1x1), hard-swish; BatchNorm + activation
               modules that call ``F.batch_norm``; a ``Linear`` subclass head
convnext       patchify stem + channels-first LayerNorm, ConvNeXt blocks
               (depthwise 7x7, channels-last LayerNorm, MLP with GELU, layer
               scale), a downsampling LayerNorm2d + 2x2 conv
densenet       stem, two dense blocks of BN-ReLU-conv layers concatenating
               their growth, a 1x1 transition with average pooling
=============  ================================================================

They are not registry architectures: a merge loads them as a user's own models,
``--model benchmarks/cnn_zoo.py:make --model-args '{"name": "mobilenet"}'``, so their
feature groups come from discovery. Nothing here trains; ``train_models.py`` and
``run_merges.py`` do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Linear):
    """A Linear whose forward is its own (as some model libraries write it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class BatchNormAct2d(nn.BatchNorm2d):
    """BatchNorm then an activation, the norm as a functional call."""

    def __init__(self, channels: int, act: type[nn.Module] | None = nn.ReLU) -> None:
        super().__init__(channels)
        self.act = act() if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factor = 0.0
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = (
                1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            )
        training = self.training or not self.track_running_stats
        x = F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, training, factor,
            self.eps,
        )  # fmt: skip
        return self.act(x)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an (N, C, H, W) tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias)
        return x.permute(0, 3, 1, 2)


# ---------------------------------------------------------------------------
# mobilenet


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.relu(self.reduce(x.mean((2, 3), keepdim=True)))
        return x * F.hardsigmoid(self.expand(s))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, expand: int, stride: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.expand = nn.Conv2d(cin, hidden, 1, bias=False)
        self.bn1 = BatchNormAct2d(hidden, nn.Hardswish)
        self.dw = nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False)
        self.bn2 = BatchNormAct2d(hidden, nn.Hardswish)
        self.se = SqueezeExcite(hidden, max(8, hidden // 4))
        self.project = nn.Conv2d(hidden, cout, 1, bias=False)
        self.bn3 = BatchNormAct2d(cout, None)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.se(self.bn2(self.dw(self.bn1(self.expand(x)))))
        y = self.bn3(self.project(y))
        return x + y if self.residual else y


class MobileNet(nn.Module):
    def __init__(self, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, 2, 1, bias=False)
        self.stem_bn = BatchNormAct2d(width, nn.Hardswish)
        settings = [(width, width, 1, 1), (width, 2 * width, 4, 2), (2 * width, 2 * width, 4, 1)]
        settings += [(2 * width, 4 * width, 4, 2), (4 * width, 4 * width, 4, 1)]
        self.blocks = nn.Sequential(*(InvertedResidual(*s) for s in settings))
        self.head_conv = nn.Conv2d(4 * width, 8 * width, 1, bias=False)
        self.head_bn = BatchNormAct2d(8 * width, nn.Hardswish)
        self.classifier = Linear(8 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head_bn(self.head_conv(self.blocks(self.stem_bn(self.stem(x)))))
        return self.classifier(x.mean((2, 3)))


# ---------------------------------------------------------------------------
# convnext


class ConvNeXtBlock(nn.Module):
    def __init__(self, width: int, scale: float = 1e-1) -> None:
        super().__init__()
        self.dw = nn.Conv2d(width, width, 7, padding=3, groups=width)
        self.norm = nn.LayerNorm(width)
        self.fc1 = Linear(width, 4 * width)
        self.fc2 = Linear(4 * width, width)
        self.gamma = nn.Parameter(torch.full((width,), scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.dw(x).permute(0, 2, 3, 1))
        y = self.gamma * self.fc2(F.gelu(self.fc1(y)))
        return x + y.permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    def __init__(self, width: int = 32, depths: tuple[int, int] = (2, 2), num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 4, stride=4)
        self.stem_norm = LayerNorm2d(width)
        self.stage1 = nn.Sequential(*(ConvNeXtBlock(width) for _ in range(depths[0])))
        self.down_norm = LayerNorm2d(width)
        self.down = nn.Conv2d(width, 2 * width, 2, stride=2)
        self.stage2 = nn.Sequential(*(ConvNeXtBlock(2 * width) for _ in range(depths[1])))
        self.norm = nn.LayerNorm(2 * width)
        self.head = Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage1(self.stem_norm(self.stem(x)))
        x = self.stage2(self.down(self.down_norm(x)))
        return self.head(self.norm(x.mean((2, 3))))


# ---------------------------------------------------------------------------
# densenet


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv(F.relu(self.norm(x)))], 1)


class Transition(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.conv(F.relu(self.norm(x))), 2)


class DenseNet(nn.Module):
    def __init__(self, width: int = 24, growth: int = 12, layers: int = 4, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        c = width
        block1 = []
        for _ in range(layers):
            block1.append(DenseLayer(c, growth))
            c += growth
        self.block1 = nn.Sequential(*block1)
        self.transition = Transition(c, c // 2)
        c //= 2
        block2 = []
        for _ in range(layers):
            block2.append(DenseLayer(c, growth))
            c += growth
        self.block2 = nn.Sequential(*block2)
        self.norm = nn.BatchNorm2d(c)
        self.head = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.transition(self.block1(F.max_pool2d(self.stem(x), 2))))
        return self.head(F.relu(self.norm(x)).mean((2, 3)))


ZOO: dict[str, type[nn.Module]] = {
    "mobilenet": MobileNet,
    "convnext": ConvNeXt,
    "densenet": DenseNet,
}


def make(name: str = "mobilenet", **kwargs: object) -> nn.Module:
    """One of :data:`ZOO` (keyword arguments: its constructor's, e.g. ``width``)."""
    if name not in ZOO:
        raise ValueError(f"unknown CNN {name!r}; choose from {', '.join(ZOO)}")
    return ZOO[name](**kwargs)
