"""Small training loop and the bundled digits data, for the demo, tests and benchmarks."""

from __future__ import annotations

from importlib import resources

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..io.files import Dataset


def digits(test_size: int = 497, seed: int = 0) -> tuple[Dataset, Dataset]:
    """scikit-learn's 8x8 digits (1797 samples, shipped with the package), scaled to [0, 1]
    and standardised with the training split's mean and std; a seeded train/test split."""
    with resources.files("ccamerge.data").joinpath("digits.npz").open("rb") as f:
        arrays = np.load(f)
        x = torch.tensor(arrays["x"], dtype=torch.float32) / 16.0
        y = torch.tensor(arrays["y"], dtype=torch.int64)
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    test, train = idx[:test_size], idx[test_size:]
    mean, std = x[train].mean(0), x[train].std(0).clamp_min(0.1)
    x = (x - mean) / std
    return Dataset(x[train], y[train], "digits:train"), Dataset(x[test], y[test], "digits:test")


def train_classifier(
    model: nn.Module,
    data: Dataset,
    epochs: int = 30,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    weight_decay: float = 0.0,
) -> nn.Module:
    """Adam on cross-entropy, seeded data order. Returns the model in eval mode."""
    assert data.y is not None
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(data), generator=gen)
        for i in range(0, len(data), batch_size):
            idx = order[i : i + batch_size]
            if len(idx) < 2:
                continue
            loss = F.cross_entropy(model(data.x[idx]), data.y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()
