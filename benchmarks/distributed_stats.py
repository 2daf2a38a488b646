"""The statistics pass and the refit with 1 and K processes (torchrun, gloo): wall time
and peak memory per process.

    python benchmarks/distributed_stats.py --processes 1 2 --images 4000

The two cached ResNet20 x2 checkpoints (``cache/models/resnet20x2_s0.pt`` and ``_s1.pt``,
from ``train_models.py``) on the first ``--images`` images of the cached calibration set
(``cache/fmnist_cifar_calib.npz``), the steps of the default ``ccamerge merge``: the
statistics pass, CCA at the refit's fixed ridge, then the refit. Each process count runs
under ``torchrun --nproc-per-node K`` with one torch thread per process; every rank
times the statistics pass and the refit (its share of the batches and the float64
reductions, which wait for the slowest rank) and reads its resident high-water mark
(``VmHWM``, reset just before each of the two). Results go to
``benchmarks/results/distributed_stats.json``, with the load average before and after
each run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from memory_stats import MiB, _reset_peak, _status_kib  # noqa: E402
from models import MODEL_DIR  # noqa: E402

CALIB = HERE / "cache" / "fmnist_cifar_calib.npz"
CHECKPOINTS = [MODEL_DIR / f"resnet20x2_s{seed}.pt" for seed in (0, 1)]


def measured(step):
    """``(result, seconds, peak RSS in MiB)`` of ``step()``, the peak reset before it."""
    _reset_peak()
    t0 = time.perf_counter()
    result = step()
    seconds = time.perf_counter() - t0
    return result, seconds, _status_kib("VmHWM") * 1024 / MiB


def worker(images: int, batch_size: int) -> None:
    """One rank: the statistics pass, alignment, the refit; then a RESULT line."""
    from ccamerge.methods import make_method
    from ccamerge.pipeline import (
        REFIT_GAMMA,
        Calibration,
        MergeRecipe,
        Progress,
        RefitSettings,
        RunContext,
        align_models,
        assemble_and_refit,
        gather_statistics,
        load_models,
        read_calibration,
        resolve_device,
    )
    from ccamerge.runtime import distributed

    device = resolve_device("cpu")
    loaded = load_models([str(p) for p in CHECKPOINTS])
    calib = read_calibration(str(CALIB), images, 0)
    distributed.synchronise()
    stats, stats_s, stats_peak = measured(
        lambda: gather_statistics(loaded, Calibration(calib, batch_size, device), Progress())
    )
    alignment = align_models(make_method("cca", gamma=REFIT_GAMMA), loaded, 0, stats)
    del stats
    ctx = RunContext()
    distributed.synchronise()
    recipe = MergeRecipe([0.5, 0.5], 0, device=device, alignment=alignment)
    refitted, refit_s, refit_peak = measured(
        lambda: assemble_and_refit(
            loaded, recipe, Calibration(calib, batch_size, device), RefitSettings(), ctx
        )
    )
    if refitted is None:
        raise SystemExit(f"the refit did not run: {ctx.warnings}")
    row = {
        "rank": distributed.rank(),
        "statistics_seconds": stats_s,
        "statistics_peak_mib": stats_peak,
        "refit_seconds": refit_s,
        "refit_peak_mib": refit_peak,
        "refit_mode": refitted.section()["mode"],
    }
    print("RESULT " + json.dumps(row), flush=True)
    distributed.shutdown()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--images", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=256)  # ccamerge merge's default
    p.add_argument("--worker", action="store_true")
    args = p.parse_args()
    if args.worker:
        return worker(args.images, args.batch_size)
    missing = [str(p) for p in (*CHECKPOINTS, CALIB) if not p.exists()]
    if missing:
        raise SystemExit(f"missing (run train_models.py first): {', '.join(missing)}")
    rows = []
    for k in args.processes:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(k),
               "--master-addr", "127.0.0.1", "--master-port", "29541", __file__,
               "--images", str(args.images), "--batch-size", str(args.batch_size),
               "--worker"]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        before = os.getloadavg()
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
        ranks = [json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")]
        rows.append({"processes": k, "images": args.images, "batch_size": args.batch_size,
                     "ranks": sorted(ranks, key=lambda r: r["rank"]),
                     "loadavg_before": before, "loadavg_after": os.getloadavg()})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    (HERE / "results" / "distributed_stats.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
