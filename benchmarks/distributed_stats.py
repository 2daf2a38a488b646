"""The statistics pass with 1 and K processes (torchrun, gloo): wall time and peak memory.

    python benchmarks/distributed_stats.py --processes 1 2 --images 4000

Two random-weight ResNet20 x2 on random 32 px images (timing only). Each process
count runs under ``torchrun --nproc-per-node K``; every rank times its
``gather_statistics`` (its share of the batches and the float64 reduction) and
reports its peak RSS. Results go to ``benchmarks/results/distributed_stats.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def worker(paths: list[str], images: int, batch_size: int) -> None:
    """One rank: the statistics pass, then a RESULT line per rank."""
    from ccamerge import distributed
    from ccamerge.files import Dataset
    from ccamerge.pipeline import Progress, gather_statistics, load_models, resolve_device

    device = resolve_device("cpu")
    loaded = load_models(paths)
    x = torch.randn(images, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    distributed.synchronise()
    t0 = time.perf_counter()
    gather_statistics(loaded, Dataset(x, None), batch_size, device, Progress())
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    row = {"rank": distributed.rank(), "seconds": seconds, "peak_rss": peak}
    print("RESULT " + json.dumps(row), flush=True)
    distributed.shutdown()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--images", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--worker", nargs="*")
    args = p.parse_args()
    if args.worker is not None:
        return worker(args.worker, args.images, args.batch_size)
    import models as Mdl

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for seed in range(2):
            torch.manual_seed(1000 + seed)
            paths.append(str(Path(tmp) / f"r{seed}.pt"))
            torch.save(Mdl.build("resnet20x2").state_dict(), paths[-1])
        for k in args.processes:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(k),
                   "--master-addr", "127.0.0.1", "--master-port", "29541", __file__,
                   "--images", str(args.images), "--batch-size", str(args.batch_size),
                   "--worker", *paths]  # fmt: skip
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
            ranks = [
                json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")
            ]
            rows.append({"processes": k, "images": args.images, "ranks": ranks,
                         "loadavg": os.getloadavg()})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    (HERE / "results" / "distributed_stats.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
