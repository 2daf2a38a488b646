"""Small CNNs in the patterns of common vision model libraries, written here: layers
subclassed with their own forward (a Linear calling ``F.linear``, a BatchNorm +
activation calling ``F.batch_norm``, a channels-first LayerNorm calling
``F.layer_norm`` between permutes), depthwise and grouped convolutions, DenseNet
concatenation, layer scale, squeeze-excitation and GroupNorm; and a network of
opaque custom operations. Loaded by tests/test_cnn_patterns.py through
``--model tests/cnn_nets.py:make_cnn``; inputs are 3 x 8 x 8 images."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Linear):
    """An ``nn.Linear`` subclass with its own forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class BatchNormAct2d(nn.BatchNorm2d):
    """BatchNorm and an activation in one module, the norm as a functional call."""

    def __init__(self, channels: int, act: type[nn.Module] = nn.ReLU) -> None:
        super().__init__(channels)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factor = 0.0
        if self.training and self.track_running_stats:  # momentum None: a cumulative mean
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
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def _head(width: int, classes: int = 5) -> nn.Module:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, classes))


class SubclassedLinear(nn.Module):
    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.fc1 = Linear(width, 7)
        self.fc2 = Linear(7, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(F.relu(self.bn(self.conv(x))), 1).flatten(1)
        return self.fc2(F.relu(self.fc1(x)))


class BnAct(nn.Module):
    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.bn1 = BatchNormAct2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = BatchNormAct2d(width, nn.Hardswish)
        self.head = _head(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn2(self.conv2(self.bn1(self.conv1(x)))))


class InvertedResidual(nn.Module):
    """Expand 1x1, depthwise 3x3, project 1x1, with the residual (a mobile block)."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.expand = nn.Conv2d(width, hidden, 1, bias=False)
        self.bn1 = BatchNormAct2d(hidden, nn.ReLU6)
        self.dw = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.project = nn.Conv2d(hidden, width, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self.bn2(self.dw(self.bn1(self.expand(x)))))
        return x + self.bn3(self.project(y))


class Depthwise(nn.Module):
    def __init__(self, width: int = 4, hidden: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.block = InvertedResidual(width, hidden)
        self.head = _head(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(F.relu(self.stem(x))))


class Grouped(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 6, 3, padding=1, groups=2)
        self.gn = nn.GroupNorm(2, 6)
        self.head = _head(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.gn(self.conv2(F.relu(self.conv1(x))))))


class DenseLayer(nn.Module):
    def __init__(self, width: int, growth: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(width)
        self.conv = nn.Conv2d(width, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv(F.relu(self.norm(x)))], 1)


class Dense(nn.Module):
    def __init__(self, width: int = 4, growth: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.layers = nn.Sequential(DenseLayer(width, growth), DenseLayer(width + growth, growth))
        self.norm = nn.BatchNorm2d(width + 2 * growth)
        self.head = _head(width + 2 * growth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.norm(self.layers(self.stem(x)))))


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7, channels-last LayerNorm, MLP, layer scale, residual."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(width, width, 7, padding=3, groups=width)
        self.norm = nn.LayerNorm(width)
        self.fc1 = Linear(width, 2 * width)
        self.fc2 = Linear(2 * width, width)
        self.gamma = nn.Parameter(torch.full((width,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.dw(x).permute(0, 2, 3, 1))
        y = self.gamma * self.fc2(F.gelu(self.fc1(y)))
        return x + y.permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 2, stride=2)
        self.stem_norm = LayerNorm2d(width)
        self.block = ConvNeXtBlock(width)
        self.head = _head(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.stem_norm(self.stem(x))))


class SqueezeExcite(nn.Module):
    def __init__(self, width: int, reduced: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(width, reduced, 1)
        self.expand = nn.Conv2d(reduced, width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.expand(F.relu(self.reduce(s))))


class SE(nn.Module):
    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.se = SqueezeExcite(width, 3)
        self.head = _head(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.se(F.relu(self.bn(self.conv(x)))))


class ChannelNorm(nn.Module):
    """LayerNorm2d between two convolutions."""

    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.norm = LayerNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.head = _head(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.conv2(F.gelu(self.norm(self.conv1(x))))))


class GroupNormNet(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.gn = nn.GroupNorm(4, width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.head = _head(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.conv2(F.relu(self.gn(self.conv1(x))))))


class OpaqueConv(nn.Module):
    """A custom op torch.fx cannot trace (data-dependent control flow)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return F.relu(y) if bool(y.sum() > -1e30) else y


class Opaque(nn.Module):
    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.op1 = OpaqueConv(3, width)
        self.op2 = OpaqueConv(width, width)
        self.head = _head(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.op2(self.op1(x)))


class ChannelMixing(nn.Module):
    """A cumulative sum over the channels after the second conv: its units stay
    untransformed, the first conv's are aligned."""

    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.head = _head(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cumsum(self.conv2(F.relu(self.conv1(x))), dim=1))


NETS: dict[str, type[nn.Module]] = {
    "subclassed_linear": SubclassedLinear,
    "bn_act": BnAct,
    "depthwise": Depthwise,
    "grouped": Grouped,
    "concat": Dense,
    "layer_scale": ConvNeXt,
    "squeeze_excite": SE,
    "layernorm2d": ChannelNorm,
    "groupnorm": GroupNormNet,
    "opaque": Opaque,
    "channel_mixing": ChannelMixing,
}


def make_cnn(name: str = "depthwise") -> nn.Module:
    return NETS[name]()
