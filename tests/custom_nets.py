"""A user's own network, loaded by tests/test_custom_model.py through ``--model
tests/custom_nets.py:make_net``. It is not a registered architecture: its feature
groups must come from discovery (functional ReLU, residual additions, dropout,
LayerNorm), and a few broken factories exercise the error messages."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    """``x + fc2(dropout(relu(fc1(x))))``: fc1's units are one group, the stream another."""

    def __init__(self, width: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.drop(F.relu(self.fc1(x))))


class ResidualMLP(nn.Module):
    def __init__(
        self,
        in_features: int = 64,
        width: int = 32,
        hidden: int = 64,
        depth: int = 2,
        num_classes: int = 10,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(in_features, width)
        self.norm = nn.LayerNorm(width)
        self.blocks = nn.Sequential(*(Block(width, hidden, dropout) for _ in range(depth)))
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm(self.embed(x.flatten(1))))
        return self.head(F.relu(self.blocks(x)))


def make_net(width: int = 32, hidden: int = 64, depth: int = 2) -> nn.Module:
    return ResidualMLP(width=width, hidden=hidden, depth=depth)


class WrappedOutput(ResidualMLP):
    """The same network with its logits in a tuple (beside an auxiliary output) or a
    dict, as many models' forwards return them."""

    def __init__(self, output: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.output = output

    def forward(self, x: torch.Tensor):
        logits = super().forward(x)
        if self.output == "tuple":
            return logits, logits.sum(1)
        return {"logits": logits}


def make_wrapped_net(output: str, width: int = 32, hidden: int = 64) -> nn.Module:
    return WrappedOutput(output, width=width, hidden=hidden)


class ConvNet(nn.Module):
    """A small conv net whose input shape discovery cannot guess (--input-shape)."""

    def __init__(self, width: int = 4, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(x + self.bn2(self.conv2(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def make_convnet(width: int = 4) -> nn.Module:
    return ConvNet(width)


def not_a_module(width: int = 32) -> object:
    return {"width": width}


def broken(width: int = 32) -> nn.Module:
    raise ValueError(f"width {width} is not supported")


class Gated(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.fc = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) if x.sum() > 0 else -self.fc(x)


def make_gated(width: int = 8) -> nn.Module:
    return Gated(width)


class TokenClassifier(nn.Module):
    """Token ids -> embedding -> mean over the sequence -> MLP (a text classifier)."""

    def __init__(self, vocab: int = 50, dim: int = 8, hidden: int = 16, classes: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(self.embed(ids).mean(1))))


def make_token_net() -> nn.Module:
    return TokenClassifier()


class TokenLM(nn.Module):
    """A language model of one token at a time: embedding, MLP, logits over the vocabulary
    at every position ((batch, length, vocabulary) outputs)."""

    def __init__(self, vocab: int = 50, dim: int = 8, hidden: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(self.embed(ids))))


def make_token_lm() -> nn.Module:
    return TokenLM()
