"""Residual networks' shared pieces: the BasicBlock/Bottleneck module, block parsing from
checkpoint keys, the residual spec builder and the stem/head checks (used by
:mod:`ccamerge.models.archs.resnet_cifar` and :mod:`ccamerge.models.archs.resnet_tv`)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..registry import NotThisArchitecture
from ..spec import CollectOn, MergeSpec, SpecBuilder

_BN_KEYS = ("weight", "bias", "running_mean", "running_var")


_BLOCK = re.compile(r"^layer(\d+)\.(\d+)\.")


class ResidualBlock(nn.Module):
    """``relu(bnN(convN(... relu(bn1(conv1(x))) ...)) + shortcut(x))``.

    ``channels = [in, mid..., out]`` and ``kernels`` (one per conv) describe
    the main path ``conv1, bn1, ..., convN, bnN`` (no conv biases, padding
    k//2). The stride sits on the first conv with a kernel larger than 1 (the
    first conv of a BasicBlock, the 3x3 conv of a torchvision Bottleneck). The
    shortcut, when ``shortcut_kernel`` is given, is ``nn.Sequential(conv, BN)``
    registered under ``shortcut_name`` (``shortcut`` or ``downsample``);
    otherwise it is the identity.
    """

    def __init__(
        self,
        channels: Sequence[int],
        kernels: Sequence[int],
        stride: int = 1,
        shortcut_name: str = "shortcut",
        shortcut_kernel: int | None = None,
    ) -> None:
        super().__init__()
        if len(kernels) != len(channels) - 1:
            raise ValueError("need one kernel per conv: len(kernels) == len(channels) - 1")
        self.n_convs = len(kernels)
        stride_at = next((i for i, k in enumerate(kernels) if k > 1), 0)
        for i, k in enumerate(kernels):
            conv = nn.Conv2d(
                channels[i],
                channels[i + 1],
                kernel_size=k,
                stride=stride if i == stride_at else 1,
                padding=k // 2,
                bias=False,
            )
            setattr(self, f"conv{i + 1}", conv)
            setattr(self, f"bn{i + 1}", nn.BatchNorm2d(channels[i + 1]))
        self.relu = nn.ReLU()
        self.shortcut_name = shortcut_name
        self.has_shortcut = shortcut_kernel is not None
        if shortcut_kernel is not None:
            k = int(shortcut_kernel)
            sc = nn.Sequential(
                nn.Conv2d(
                    channels[0],
                    channels[-1],
                    kernel_size=k,
                    stride=stride,
                    padding=k // 2,
                    bias=False,
                ),
                nn.BatchNorm2d(channels[-1]),
            )
            setattr(self, shortcut_name, sc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for i in range(1, self.n_convs + 1):
            out = getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(out))
            if i < self.n_convs:
                out = self.relu(out)
        identity = getattr(self, self.shortcut_name)(x) if self.has_shortcut else x
        out = out + identity
        return self.relu(out)


def make_stages(
    blocks: Sequence[Mapping[str, Any]], shortcut_name: str
) -> list[tuple[str, nn.Sequential]]:
    """Config blocks -> ``[("layer1", nn.Sequential(...)), ...]`` in order."""
    stages: dict[str, list[nn.Module]] = {}
    for blk in blocks:
        stage, _ = blk["name"].split(".")
        stages.setdefault(stage, []).append(
            ResidualBlock(
                blk["channels"],
                blk["kernels"],
                stride=int(blk["stride"]),
                shortcut_name=shortcut_name,
                shortcut_kernel=blk["shortcut"],
            )
        )
    return [(name, nn.Sequential(*mods)) for name, mods in stages.items()]


class MissingShortcut(Exception):
    """A block changes shape but has no shortcut parameters."""

    def __init__(self, block: str, c_in: int, c_out: int, stride: int) -> None:
        super().__init__(block)
        self.block, self.c_in, self.c_out, self.stride = block, c_in, c_out, stride


def parse_blocks(
    sd: Mapping[str, torch.Tensor],
    shortcut_name: str,
    stem_width: int,
    score: float,
) -> list[dict[str, Any]]:
    """Read ``layer{s}.{j}`` blocks from a checkpoint's names and shapes.

    Stages must be numbered 1, 2, ... and blocks 0, 1, ...; block 0 of every
    stage after the first has stride 2 (the only thing not readable from
    shapes). Returns one dict per block: ``name``, ``channels`` ([in, mid...,
    out]), ``kernels``, ``stride``, ``shortcut`` (kernel size or None). Raises
    :class:`MissingShortcut` for a block whose shape changes without shortcut
    parameters, NotThisArchitecture for anything else that does not fit.
    """
    found: dict[int, set[int]] = {}
    for k in sd:
        m = _BLOCK.match(k)
        if m:
            found.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if not found:
        raise NotThisArchitecture("no tensor named like 'layer1.0.conv1.weight'", score)
    stage_ids = sorted(found)
    if stage_ids != list(range(1, len(stage_ids) + 1)):
        raise NotThisArchitecture(f"stages are numbered {stage_ids}, not 1, 2, ...", score)

    def shape(k: str) -> tuple[int, ...]:
        return tuple(sd[k].shape)

    blocks: list[dict[str, Any]] = []
    width = stem_width
    for s in stage_ids:
        ids = sorted(found[s])
        if ids != list(range(len(ids))):
            raise NotThisArchitecture(
                f"blocks of layer{s} are numbered {ids}, not 0, 1, ...", score
            )
        for j in ids:
            name = f"layer{s}.{j}"
            stride = 2 if (s > 1 and j == 0) else 1
            channels = [width]
            kernels: list[int] = []
            i = 1
            while f"{name}.conv{i}.weight" in sd:
                w = f"{name}.conv{i}.weight"
                sh = shape(w)
                if len(sh) != 4 or sh[2] != sh[3] or sh[2] % 2 == 0:
                    raise NotThisArchitecture(
                        f"{w} has shape {sh}: not a square odd-kernel conv", score
                    )
                if sh[1] != channels[-1]:
                    grouped = sh[1] < channels[-1] and channels[-1] % sh[1] == 0
                    why = " (grouped convolutions are not supported)" if grouped else ""
                    raise NotThisArchitecture(
                        f"{w} takes {sh[1]} channels but {channels[-1]} arrive{why}", score
                    )
                for p in _BN_KEYS:
                    k = f"{name}.bn{i}.{p}"
                    if k not in sd or shape(k) != (sh[0],):
                        raise NotThisArchitecture(f"{k} is missing or not of size {sh[0]}", score)
                channels.append(int(sh[0]))
                kernels.append(int(sh[2]))
                i += 1
            if not kernels:
                raise NotThisArchitecture(f"{name} has no conv1.weight", score)
            c_in, c_out = channels[0], channels[-1]
            sc_w = f"{name}.{shortcut_name}.0.weight"
            shortcut: int | None = None
            if sc_w in sd:
                sh = shape(sc_w)
                if len(sh) != 4 or sh[:2] != (c_out, c_in) or sh[2] != sh[3] or sh[2] % 2 == 0:
                    raise NotThisArchitecture(
                        f"{sc_w} has shape {sh}, expected ({c_out}, {c_in}, k, k) with k odd",
                        score,
                    )
                shortcut = int(sh[2])
            elif c_in != c_out or stride != 1:
                raise MissingShortcut(name, c_in, c_out, stride)
            blocks.append(
                {
                    "name": name,
                    "channels": channels,
                    "kernels": kernels,
                    "stride": stride,
                    "shortcut": shortcut,
                }
            )
            width = c_out
    return blocks


def residual_spec(
    stem_width: int,
    blocks: Sequence[Mapping[str, Any]],
    shortcut_name: str,
    head: str,
    stem_collect: tuple[str, CollectOn],
) -> MergeSpec:
    """Feature groups of a residual network (docs/cca.md, 'Feature groups').

    * ``stream{i}``: one group per residual stream. ``stream0`` starts at the
      stem (``conv1``/``bn1``); each shortcut conv starts the next one. Members:
      the stem's or shortcut's conv/BN output, each writing block's last
      conv/BN output, the input axis of each reading block's ``conv1`` and
      shortcut conv, and the head's input. Collected at the output of the last
      block that writes the stream (post-ReLU after the addition); a stream
      only the stem writes is collected at ``stem_collect``.
    * ``{block}.conv{i}``: one group per hidden conv output inside a block
      (conv1 of a BasicBlock; conv1 and conv2 of a Bottleneck): the conv's
      output axis, its BN, the next conv's input axis. Collected at the input
      of the next conv (post-BN, post-ReLU).
    """
    b = SpecBuilder()
    n_stream = 0
    stream, width = "stream0", int(stem_width)
    b.writes(stream, width, "conv1", bias=False)
    b.norm(stream, width, "bn1")
    last_writer: str | None = None

    def close(stream: str, last_writer: str | None) -> None:
        if last_writer is None:
            b.collect(stream, *stem_collect)
        else:
            b.collect(stream, last_writer, on="output")

    for blk in blocks:
        name = blk["name"]
        channels = [int(c) for c in blk["channels"]]
        n = len(channels) - 1
        b.reads(stream, width, f"{name}.conv1")
        if blk["shortcut"] is not None:
            sc = f"{name}.{shortcut_name}"
            b.reads(stream, width, f"{sc}.0")
            close(stream, last_writer)
            n_stream += 1
            stream, width, last_writer = f"stream{n_stream}", channels[-1], None
            b.writes(stream, width, f"{sc}.0", bias=False)
            b.norm(stream, width, f"{sc}.1")
        for i in range(1, n):
            group = f"{name}.conv{i}"
            b.writes(group, channels[i], f"{name}.conv{i}", bias=False)
            b.norm(group, channels[i], f"{name}.bn{i}")
            b.reads(group, channels[i], f"{name}.conv{i + 1}")
            b.collect(group, f"{name}.conv{i + 1}", on="input")
        b.writes(stream, width, f"{name}.conv{n}", bias=False)
        b.norm(stream, width, f"{name}.bn{n}")
        last_writer = name
    b.reads(stream, width, head)
    close(stream, last_writer)
    return b.build()


def stage_summary(blocks: Sequence[Mapping[str, Any]]) -> tuple[list[int], list[int]]:
    """(blocks per stage, output width per stage) of a block list."""
    counts: dict[str, int] = {}
    widths: dict[str, int] = {}
    for blk in blocks:
        stage = blk["name"].split(".")[0]
        counts[stage] = counts.get(stage, 0) + 1
        widths[stage] = int(blk["channels"][-1])
    return list(counts.values()), list(widths.values())


def check_stem(
    sd: Mapping[str, torch.Tensor], kernel: int, layout: str, score: float
) -> tuple[int, int]:
    """``conv1.weight`` must be a kernel x kernel conv without bias, with ``bn1``."""
    if "conv1.weight" not in sd:
        raise NotThisArchitecture("no stem 'conv1.weight'", score)
    sh = tuple(sd["conv1.weight"].shape)
    if len(sh) != 4 or sh[2:] != (kernel, kernel):
        raise NotThisArchitecture(
            f"stem conv1.weight has shape {sh}; the {layout} layout has a {kernel}x{kernel} stem",
            score,
        )
    for p in _BN_KEYS:
        k = f"bn1.{p}"
        if k not in sd or tuple(sd[k].shape) != (sh[0],):
            raise NotThisArchitecture(f"{k} is missing or not of size {sh[0]}", score)
    return int(sh[0]), int(sh[1])


def check_head(sd: Mapping[str, torch.Tensor], head: str, width: int, score: float) -> int:
    w = f"{head}.weight"
    if w not in sd or f"{head}.bias" not in sd:
        raise NotThisArchitecture(f"no '{head}.weight' and '{head}.bias' head", score)
    sh = tuple(sd[w].shape)
    if len(sh) != 2 or sh[1] != width:
        raise NotThisArchitecture(
            f"{w} has shape {sh}, expected (classes, {width}) after the last block", score
        )
    return int(sh[0])
