"""One prepared check for a machine with a CUDA GPU (about 5-10 minutes on one GPU).

    python benchmarks/gpu_check.py

1. The test suite's CUDA-marked tests (``pytest -m cuda``); the check fails if any of
   them is skipped, so it cannot pass without really running on the GPU.
2. ``ccamerge merge --device cuda`` and the same merge on the CPU, N = 2, random weights
   and random inputs (no data to download): ResNet20 x2 on 1000 32 px images and a
   torchvision-layout ResNet-50 on 32 224 px images. Each network is merged twice: as
   ``ccamerge merge`` does by default (the refit, CCA at its fixed ridge), and with
   ``--no-refit --gamma 0.1`` (the paper's merge at a stated ridge: no held-out search,
   whose choice could differ between devices). Every merged tensor of a CPU merge is
   compared with the same merge's on the GPU: the largest relative difference
   ``max|gpu - cpu| / max|cpu|`` over tensors (a BatchNorm's running mean relative to
   its running std) must stay under ``TOLERANCE`` (convolutions on the GPU may use
   TF32; on the CPU, inputs perturbed by 1e-3 relative moved a refitted ResNet14's
   tensors by 4.9e-3 measured so).
3. The default ResNet20 x2 merge under ``torchrun --nproc-per-node 1 --device cuda``
   (the process group with NCCL), compared with the plain GPU merge the same way.

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
    from ccamerge.models.archs.resnet_cifar import cifar_resnet_config
    from ccamerge.models.archs.resnet_tv import tv_resnet_config
    from ccamerge.models.registry import get_architecture

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


def run_merge(launcher: list[str], paths, data, out: Path, device: str, options) -> dict:
    cmd = [*launcher, "merge", *paths, "--data", data, "--output", str(out), "--device",
           device, "--batch-size", "64", "--json", "--force", *options]  # fmt: skip
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        return {"device": device, "ok": False, "error": done.stderr.strip()[-2000:]}
    report = json.loads(done.stdout)
    refitted = report.get("refit") is not None
    return {
        "device": device,
        "ok": refitted == ("--no-refit" not in options),  # a skipped refit fails the check
        "refit": refitted,
        "wall_seconds": wall,
        "timings": report["timings"],
        "warnings": report["warnings"],
    }


def largest_difference(a_path: Path, b_path: Path) -> float:
    """``max|a - b| / max|a|`` over floating tensors; a BatchNorm's running mean on the
    scale of its running std (the refit can leave means near 0, e.g. 1e-9)."""
    a, b = load_file(a_path), load_file(b_path)
    worst = 0.0
    for k, t in a.items():
        if t.is_floating_point():
            x, y = t.double(), b[k].double()
            var = k.removesuffix("running_mean") + "running_var"
            scale = a[var].double().sqrt() if k.endswith("running_mean") else x
            worst = max(worst, float((x - y).abs().max() / scale.abs().max().clamp_min(1e-300)))
    return worst


def cuda_tests() -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "cuda", "-rs", "-q", "tests"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-500:]
    ok = done.returncode == 0 and "skipped" not in last and "passed" in last
    return {"ok": ok, "summary": last}


PLAIN = ("--no-refit", "--gamma", "0.1")  # the paper's merge at a stated ridge
RUNS = [  # (label, under torchrun, device, options, the GPU run it is compared with)
    ("cuda", False, "cuda", (), None),
    ("cpu", False, "cpu", (), "cuda"),
    ("cuda --no-refit", False, "cuda", PLAIN, None),
    ("cpu --no-refit", False, "cpu", PLAIN, "cuda --no-refit"),
    ("torchrun cuda", True, "cuda", (), "cuda"),  # ResNet20 x2 only
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
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
        "tolerance": TOLERANCE,
        "cuda_tests": cuda_tests(),
        "merges": [],
    }
    print(f"CUDA tests: {doc['cuda_tests']['summary']}", flush=True)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for name in args.only:
            paths, data = prepare(name, tmp)
            outputs: dict[str, Path] = {}
            for label, distributed, device, options, compared in RUNS:
                if distributed and name != "resnet20x2":
                    continue
                out = tmp / f"{name}_{label.replace(' ', '_')}.safetensors"
                launcher = torchrun if distributed else ccamerge
                row = {"model": name, "run": label,
                       **run_merge(launcher, paths, data, out, device, options)}  # fmt: skip
                if row["ok"] and compared is not None:
                    if compared in outputs:
                        row["difference_to_cuda"] = largest_difference(out, outputs[compared])
                        row["ok"] = row["difference_to_cuda"] < TOLERANCE
                    else:
                        row["ok"], row["error"] = False, f"no {compared} merge to compare with"
                if row["ok"]:
                    outputs[label] = out
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
