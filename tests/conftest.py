"""Shared fixtures: small MLPs trained on the bundled digits (a second or two each)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# numpy's BLAS (the statistics' Gram products) on one thread, as in the torchrun workers
# the distributed tests compare this process with: its products round differently on two
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest
import torch

from ccamerge.io.files import Dataset
from ccamerge.models.archs.mlp import MLP
from ccamerge.models.archs.resnet_cifar import cifar_resnet_config
from ccamerge.models.archs.vgg import vgg_config
from ccamerge.models.registry import get_architecture
from ccamerge.models.train import digits, train_classifier


@dataclass
class TrainedMLPs:
    train: Dataset
    test: Dataset
    models: list[torch.nn.Module]
    paths: list[Path]
    calib_path: Path
    test_path: Path


@pytest.fixture(scope="session")
def digits_mlps(tmp_path_factory) -> TrainedMLPs:
    """Four 64-64-64-10 MLPs from seeds 0..3, saved as .pt, plus calib/test .npz files."""
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("digits_mlps")
    train, test = digits()
    models, paths = [], []
    for seed in range(4):
        torch.manual_seed(seed)
        model = train_classifier(MLP([64, 64, 64, 10]), train, epochs=20, seed=seed)
        path = root / f"mlp{seed}.pt"
        torch.save(model.state_dict(), path)
        models.append(model)
        paths.append(path)
    calib_path, test_path = root / "calib.npz", root / "test.npz"
    np.savez(calib_path, x=train.x.numpy(), y=train.y.numpy())
    np.savez(test_path, x=test.x.numpy(), y=test.y.numpy())
    return TrainedMLPs(train, test, models, paths, calib_path, test_path)


@dataclass
class TrainedConvNets:
    arch: str
    config: dict
    models: list[torch.nn.Module]
    paths: list[Path]


@dataclass
class DigitsConvNets:
    """The digits as 1x8x8 images (x of shape (n, 1, 8, 8)) and two trained nets per arch."""

    train: Dataset
    test: Dataset
    calib_path: Path
    test_path: Path
    nets: dict[str, TrainedConvNets]


# Both nets end at 1x1 on 8x8 inputs: the VGG after three max-pools, the ResNet by its
# global average pool. ResNet14 = two BasicBlocks per stage, widths 16/32/64 (ResNet20 x1
# with one block fewer per stage).
CONVNET_CONFIGS = {
    "vgg": vgg_config((1, 1, 1), (16, 32, 64), batch_norm=True, num_classes=10, in_channels=1),
    "resnet_cifar": cifar_resnet_config(depth=14, width=1, num_classes=10, in_channels=1),
}


@pytest.fixture(scope="session")
def digits_convnets(tmp_path_factory) -> DigitsConvNets:
    """A BN VGG (16-M-32-M-64-M) and a ResNet14 from seeds 0 and 1 each, trained on the
    digits as 1x8x8 images for 10 epochs, saved as .pt, plus calib/test .npz files.

    Trained on one thread: with the 2 cores shared, two threads ran 10-30x slower
    (spinning workers); the previous thread count is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("digits_convnets")
        train, test = digits()
        train = Dataset(train.x.reshape(-1, 1, 8, 8), train.y, "digits:train images")
        test = Dataset(test.x.reshape(-1, 1, 8, 8), test.y, "digits:test images")
        nets = {}
        for arch, config in CONVNET_CONFIGS.items():
            entry = get_architecture(arch)
            models, paths = [], []
            for seed in range(2):
                torch.manual_seed(seed)
                model = train_classifier(entry.build(config), train, epochs=10, seed=seed)
                path = root / f"{arch}{seed}.pt"
                torch.save(model.state_dict(), path)
                models.append(model)
                paths.append(path)
            nets[arch] = TrainedConvNets(arch, config, models, paths)
        calib_path, test_path = root / "calib.npz", root / "test.npz"
        np.savez(calib_path, x=train.x.numpy(), y=train.y.numpy())
        np.savez(test_path, x=test.x.numpy(), y=test.y.numpy())
    finally:
        torch.set_num_threads(threads)
    return DigitsConvNets(train, test, calib_path, test_path, nets)
