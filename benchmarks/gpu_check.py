"""One prepared check for a machine with a CUDA GPU (about 5-10 minutes on one GPU).

    python benchmarks/gpu_check.py            # add --refit once `ccamerge merge --refit` exists

1. The test suite's CUDA-marked tests (``pytest -m cuda``); the check fails if any of
   them is skipped, so it cannot pass without really running on the GPU.
2. ``ccamerge merge --device cuda`` and the same merge on the CPU, N = 2, random weights
   and random inputs (no data to download): ResNet20 x2 on 1000 32 px images and a
   torchvision-layout ResNet-50 on 32 224 px images; ``--gamma 0.1`` (no search), and
   ``--refit`` with the flag. Every merged tensor is compared with the CPU's: the
   largest relative difference ``max|gpu - cpu| / max|cpu|`` over tensors must stay
   under ``TOLERANCE`` (convolutions on the GPU may use TF32).
3. The ResNet20 x2 merge under ``torchrun --nproc-per-node 1 --device cuda`` (the
   process group with NCCL), compared with the plain GPU merge the same way.

Wall time of each merge (process start to file written) and its phases go to
``benchmarks/results/gpu_check.json``; ``make_tables.py`` turns them into the
``gpu-check`` table of docs/benchmarks.md. Exit status 1 when anything failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TOLERANCE = 1e-2
MODELS = {  # name: (registry entry, config, images, pixels)
    "resnet20x2": ("resnet_cifar", {"depth": 20, "width": 2, "shortcut_kernel": 3}, 1000, 32),
    "resnet50": ("resnet", {"depth": 50}, 32, 224),
}


def build(name: str) -> torch.nn.Module:
    from ccamerge.archs.resnet_cifar import cifar_resnet_config
    from ccamerge.archs.resnet_tv import tv_resnet_config
    from ccamerge.registry import get_architecture

    entry, cfg, _, _ = MODELS[name]
    make = cifar_resnet_config if entry == "resnet_cifar" else tv_resnet_config
    return get_architecture(entry).build(make(num_classes=10, **cfg))


def prepare(name: str, tmp: Path) -> tuple[list[str], str]:
    """Two random checkpoints and random calibration images."""
    paths = []
    for seed in range(2):
        torch.manual_seed(seed)
        path = tmp / f"{name}_{seed}.pt"
        torch.save(build(name).state_dict(), path)
        paths.append(str(path))
    _, _, images, pixels = MODELS[name]
    data = tmp / f"{name}_calib.npz"
    x = torch.randn(images, 3, pixels, pixels, generator=torch.Generator().manual_seed(0))
    np.savez(data, x=x.numpy())
    return paths, str(data)


def run_merge(launcher: list[str], paths, data, out: Path, device: str, refit: bool) -> dict:
    cmd = [*launcher, "merge", *paths, "--data", data, "--output", str(out), "--device",
           device, "--gamma", "0.1", "--batch-size", "64", "--json", "--force"]  # fmt: skip
    if refit:
        cmd.append("--refit")
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        return {"device": device, "ok": False, "error": done.stderr.strip()[-2000:]}
    report = json.loads(done.stdout)
    return {"device": device, "ok": True, "wall_seconds": wall, "timings": report["timings"]}


def largest_difference(a_path: Path, b_path: Path) -> float:
    a, b = load_file(a_path), load_file(b_path)
    worst = 0.0
    for k, t in a.items():
        if t.is_floating_point():
            x, y = t.double(), b[k].double()
            worst = max(worst, float((x - y).abs().max() / x.abs().max().clamp_min(1e-300)))
    return worst


def cuda_tests() -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "cuda", "-rs", "-q", "tests"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-500:]
    ok = done.returncode == 0 and "skipped" not in last and "passed" in last
    return {"ok": ok, "summary": last}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--refit", action="store_true", help="merge with --refit")
    p.add_argument("--only", nargs="*", default=list(MODELS), choices=list(MODELS))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check", file=sys.stderr)
        return 1
    ccamerge = [sys.executable, "-m", "ccamerge"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
                "--master-addr", "127.0.0.1", "--master-port", "29531", "-m", "ccamerge"]  # fmt: skip
    doc: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "refit": args.refit,
        "tolerance": TOLERANCE,
        "cuda_tests": cuda_tests(),
        "merges": [],
    }
    print(f"CUDA tests: {doc['cuda_tests']['summary']}", flush=True)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for name in args.only:
            paths, data = prepare(name, tmp)
            runs = {
                "cuda": (ccamerge, "cuda"),
                "cpu": (ccamerge, "cpu"),
                "torchrun cuda": (torchrun, "cuda"),
            }
            if name != "resnet20x2":
                del runs["torchrun cuda"]
            for label, (launcher, device) in runs.items():
                out = tmp / f"{name}_{label.replace(' ', '_')}.safetensors"
                row = {
                    "model": name,
                    "run": label,
                    **run_merge(launcher, paths, data, out, device, args.refit),
                }
                reference = tmp / f"{name}_cuda.safetensors"
                if row["ok"] and label != "cuda" and reference.exists():
                    row["difference_to_cuda"] = largest_difference(out, reference)
                    row["ok"] = row["difference_to_cuda"] < TOLERANCE
                doc["merges"].append(row)
                print(json.dumps(row), flush=True)
    doc["ok"] = doc["cuda_tests"]["ok"] and all(r["ok"] for r in doc["merges"])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gpu_check.json").write_text(json.dumps(doc, indent=2) + "\n")
    print("gpu check", "passed" if doc["ok"] else "FAILED", flush=True)
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    sys.exit(main())
