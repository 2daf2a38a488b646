"""Shared fixtures: small MLPs trained on the bundled digits (a second or two each)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from ccamerge.archs.mlp import MLP
from ccamerge.io import Dataset
from ccamerge.train import digits, train_classifier


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
