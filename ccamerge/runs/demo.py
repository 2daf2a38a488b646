"""``ccamerge demo``: train a few small MLPs on the bundled digits, merge them, compare.

Everything it needs ships with the package; it writes the checkpoints, the
calibration/test data and the merged model to one folder, so the printed
``ccamerge merge`` command can be rerun by hand.
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..io.files import check_outputs, save_checkpoint_atomic, write_atomic
from ..models.archs.mlp import MLP
from ..models.train import digits, train_classifier
from ..runtime.context import Progress
from ..runtime.errors import OutputError
from .merge import MergePlan, run_merge


def demo_files(n_models: int) -> list[str]:
    """The names of the files the demo writes in its folder."""
    checkpoints = [f"model{seed}.pt" for seed in range(n_models)]
    merged = [f"merged-{method}.safetensors" for method in ("average", "cca")]
    return ["calib.npz", "test.npz", *checkpoints, *merged]


def prepare_folder(out: Path, names: list[str], force: bool) -> None:
    """Create ``out``, or check (the output guard) that none of ``names`` exists in it
    unless ``force``: the demo replaces no file the user did not hand over."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out-dir {out} is a file, not a folder")
    if out.is_dir():
        check_outputs([("--out-dir", out / name, None) for name in names], [], force)
        return
    try:
        out.mkdir(parents=True)
    except OSError as e:
        raise OutputError(f"cannot create --out-dir {out}: {e.strerror or e}") from None


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_atomic(path, buffer.getvalue())


def run_demo(
    out_dir: str | Path = "ccamerge-demo",
    n_models: int = 3,
    width: int = 128,
    epochs: int = 20,
    progress: Progress | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Write everything to ``out_dir`` (created when missing); an existing file there is
    replaced only with ``force``."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    prepare_folder(out, demo_files(n_models), force)
    train, test = digits()
    calib_path, test_path = out / "calib.npz", out / "test.npz"
    save_npz(calib_path, x=train.x.numpy(), y=train.y.numpy())
    save_npz(test_path, x=test.x.numpy(), y=test.y.numpy())
    paths = []
    for seed in range(n_models):
        torch.manual_seed(seed)
        model = train_classifier(MLP([64, width, width, 10]), train, epochs=epochs, seed=seed)
        path = out / f"model{seed}.pt"
        save_checkpoint_atomic(model.state_dict(), path, {})
        paths.append(str(path))
    train_s = time.perf_counter() - t0

    results = {}
    for method in ("average", "cca"):
        plan = MergePlan.from_options(
            paths,
            data=str(calib_path),
            eval_data=str(test_path),
            method=method,
            output=str(out / f"merged-{method}.safetensors"),
            force=True,  # checked above: new, or --force
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
            f"-o {out / 'merged.safetensors'}"
        ),
    }
