"""The benchmark models: names, how to build them, where their checkpoints live.

Every model is built through the ccamerge registry entry (``build(config)``), so
the checkpoints are exactly what ``ccamerge merge`` detects and merges.

=============  ========================================================  ======
name           network                                                   data
=============  ========================================================  ======
mlp            784-256-256-10 MLP (ReLU)                                  flat
resnet20x1     CIFAR ResNet20, widths 16/32/64, 3x3-conv shortcuts, BN   cifar
resnet20x2     the same at width x2 (32/64/128)                          cifar
resnet20x4     the same at width x4 (64/128/256); scaling runs only      cifar
vgg11q         CIFAR VGG11 with BN at a quarter of the width             cifar
               (16/32/64/128/128 instead of 64/128/256/512/512)
resnet50       torchvision ResNet-50 (Bottleneck, 2048-wide stream),     cifar
               random weights, scaling runs only
mobilenet      ``cnn_zoo.py``: depthwise, squeeze-excitation, hard-swish  cifar
convnext       ``cnn_zoo.py``: depthwise 7x7, LayerNorm2d, layer scale    cifar
densenet       ``cnn_zoo.py``: concatenating dense blocks                 cifar
=============  ========================================================  ======

The ``cnn_zoo.py`` families are not in the registry: they are merged as a user's own
models (:data:`ZOO_MODEL`), their feature groups discovered by tracing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cnn_zoo
from torch import nn

from ccamerge.models.archs.resnet_cifar import cifar_resnet_config
from ccamerge.models.archs.resnet_tv import tv_resnet_config
from ccamerge.models.archs.vgg import vgg_config
from ccamerge.models.registry import get_architecture

CACHE = Path(__file__).resolve().parent / "cache"
MODEL_DIR = CACHE / "models"

ARCHS: dict[str, tuple[str, dict[str, Any], str]] = {
    # name: (registry entry, config, data view)
    "mlp": (
        "mlp",
        {"layout": "ccamerge", "indices": [0, 1, 2], "sizes": [784, 256, 256, 10], "bias": True},
        "flat",
    ),
    "resnet20x1": ("resnet_cifar", cifar_resnet_config(20, 1, shortcut_kernel=3), "cifar"),
    "resnet20x2": ("resnet_cifar", cifar_resnet_config(20, 2, shortcut_kernel=3), "cifar"),
    "resnet20x4": ("resnet_cifar", cifar_resnet_config(20, 4, shortcut_kernel=3), "cifar"),
    "vgg11q": ("vgg", vgg_config(widths=(16, 32, 64, 128, 128), batch_norm=True), "cifar"),
    "resnet50": ("resnet", tv_resnet_config(50, num_classes=10), "cifar"),
}


ZOO_MODEL = f"{Path(cnn_zoo.__file__).resolve()}:make"  # --model; --model-args {"name": ...}


def build(name: str) -> nn.Module:
    if name in cnn_zoo.NETS:
        return cnn_zoo.make(name)
    entry, config, _ = ARCHS[name]
    return get_architecture(entry).build(config)


def view(name: str) -> str:
    return "cifar" if name in cnn_zoo.NETS else ARCHS[name.split("_")[0]][2]


def checkpoint(name: str, seed: int, split: str | None = None) -> Path:
    """``benchmarks/cache/models/{name}[_split{A|B}]_s{seed}.pt``."""
    tag = f"{name}_split{split}" if split else name
    return MODEL_DIR / f"{tag}_s{seed}.pt"
