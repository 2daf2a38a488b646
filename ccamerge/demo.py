"""``ccamerge demo``: train a few small MLPs on the bundled digits, merge them, compare.

Everything it needs ships with the package; it writes the checkpoints, the
calibration/test data and the merged model to one folder, so the printed
``ccamerge merge`` command can be rerun by hand.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .archs.mlp import MLP
from .merge import MergePlan, run_merge
from .pipeline import Progress
from .train import digits, train_classifier

# A fixed ridge: quicker than choosing it on held-out data, and the printed command
# (which says --gamma) gives the same merge.
DEMO_PARAMS = {"cca": {"gamma": 0.1}}


def run_demo(
    out_dir: str | Path = "ccamerge-demo",
    n_models: int = 3,
    width: int = 128,
    epochs: int = 20,
    progress: Progress | None = None,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, test = digits()
    calib_path, test_path = out / "calib.npz", out / "test.npz"
    np.savez(calib_path, x=train.x.numpy(), y=train.y.numpy())
    np.savez(test_path, x=test.x.numpy(), y=test.y.numpy())
    paths = []
    for seed in range(n_models):
        torch.manual_seed(seed)
        model = train_classifier(MLP([64, width, width, 10]), train, epochs=epochs, seed=seed)
        path = out / f"model{seed}.pt"
        torch.save(model.state_dict(), path)
        paths.append(str(path))
    train_s = time.perf_counter() - t0

    results = {}
    for method in ("average", "cca"):
        plan = MergePlan(
            checkpoints=paths,
            data=str(calib_path),
            eval_data=str(test_path),
            method=method,
            method_params=DEMO_PARAMS.get(method, {}),
            output=str(out / f"merged-{method}.safetensors"),
            force=True,
            refit=method != "average",  # direct averaging: the plain average, no refit
        )
        results[method] = run_merge(plan, progress).report
    ev = results["cca"]["evaluation"]
    evaluation = {
        "models": ev["models"],
        "ensemble": ev["ensemble"],
        "average": results["average"]["evaluation"]["merged"],
        "merged": ev["merged"],
        "num_samples": ev["num_samples"],
    }
    return {
        "folder": str(out),
        "checkpoints": paths,
        "calibration_data": str(calib_path),
        "eval_data": str(test_path),
        "output": results["cca"]["output"],
        "evaluation": evaluation,
        "train_seconds": train_s,
        "total_seconds": time.perf_counter() - t0,
        "merge_command": (
            f"ccamerge merge {' '.join(paths)} --data {calib_path} --eval-data {test_path} "
            f"--gamma {DEMO_PARAMS['cca']['gamma']} "
            f"-o {out / 'merged.safetensors'}"
        ),
    }
