"""Rerun every benchmark: data, training, accuracy tables, cost, scaling, Markdown tables.

    python benchmarks/run_all.py            # everything (see docs/benchmarks.md for the time)
    python benchmarks/run_all.py --fast     # ResNet20 x1, N = 2, one group, 2000 samples
    python benchmarks/run_all.py --device cuda

Each step is a separate script (run it alone to redo one part); checkpoints and
finished accuracy rows are cached, so an interrupted run continues where it stopped.
``--redo`` recomputes the accuracy and cost rows instead of keeping those already
stored (scaling rows are always recomputed).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import blas_env  # noqa: E402

ENV: dict[str, str] = {}  # the scripts' environment (BLAS threads = torch threads)


def run(script: str, *args: str) -> float:
    cmd = [sys.executable, str(HERE / script), *args]
    print(f"\n$ {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=ENV)
    dt = time.perf_counter() - t0
    print(f"[{script} took {dt:.0f} s]", flush=True)
    return dt


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--fast", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per process (1 is robust on a shared machine)",
    )
    p.add_argument("--redo", action="store_true")
    p.add_argument("--skip-scaling", action="store_true")
    args = p.parse_args(argv)
    ENV.update(blas_env(args.threads))
    common = ["--device", args.device, "--threads", str(args.threads)]
    redo = ["--redo"] if args.redo else []
    t0 = time.perf_counter()
    run("fmnist.py")
    if args.fast:
        run("train_models.py", "--fast", *common)
        run(
            "run_merges.py",
            "--arch",
            "resnet20x1",
            "--n",
            "2",
            "--groups",
            "1",
            "--full-for",
            "--sizes",
            "2000",
            *common,
            *redo,
        )
        run("cost.py", "--fast", *common, *redo)
    else:
        run("train_models.py", *common)
        for arch in ("resnet20x1", "mlp", "vgg11q", "mlp_split"):
            run("run_merges.py", "--arch", arch, *common, *redo)
        # ResNet20 x2: four times the compute of x1, so no BN-off / calibration-size
        # variants (the x1 rows show those)
        run(
            "run_merges.py",
            "--arch",
            "resnet20x2",
            "--groups",
            "3",
            "--full-for",
            *common,
            *redo,
        )
        run("cnn_bench.py", *common, *redo)  # cnn_zoo.py's families, trained above
        run("cost.py", *common, *redo)
        if not args.skip_scaling:
            run("scaling.py", *common)
    run("make_tables.py")
    print(f"\nall done in {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
