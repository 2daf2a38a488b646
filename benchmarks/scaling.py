"""How the alignment scales with feature width and with the number of models.

    python benchmarks/scaling.py                  # width (ResNet20 x1/x2/x4), N (MLP), ResNet-50
    python benchmarks/scaling.py --only width
    python benchmarks/scaling.py --resnet50-size 64 --resnet50-images 64

* ``width``: ResNet20 at widths x1, x2, x4 (random initialisation: timing only), N = 2
  and 4. Statistics are gathered once on 500 calibration images; then each method's
  ``align`` is timed alone from those stored statistics.
* ``models``: the trained MLPs, N = 2 .. 6: the statistics pass (2000 images) and each
  method's alignment.
* ``resnet50``: a torchvision-layout ResNet-50 (registry entry ``resnet``, random
  weights), N = 2, on Fashion-MNIST images resized to ``--resnet50-size`` pixels
  (3 channels): the statistics pass, the CCA alignment (the widest group has 2048 units,
  so each CCA works on 2048 x 2048 blocks), and the merge with BatchNorm renormalisation.

Each configuration runs in a subprocess with an RSS sampler (see cost.py). Results go to
``benchmarks/results/scaling.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fmnist  # noqa: E402
import models as Mdl  # noqa: E402
from common import run_worker  # noqa: E402
from cost import RssSampler, accumulator_bytes, mac_counts  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("cca", "permute", "zipit", "weight-matching")


def _random_checkpoints(arch: str, n: int, tmp: Path) -> list[str]:
    paths = []
    for s in range(n):
        torch.manual_seed(1000 + s)
        p = tmp / f"{arch}_{s}.pt"
        torch.save(Mdl.build(arch).state_dict(), p)
        paths.append(str(p))
    return paths


def _time_methods(loaded, stats, methods) -> dict[str, float]:
    from ccamerge.methods import AlignContext, make_method

    out = {}
    for m in methods:
        method = make_method(m, gamma=0.1) if m == "cca" else make_method(m)
        t0 = time.perf_counter()
        method.align(AlignContext(loaded.spec, loaded.state_dicts, 0, stats))
        out[m] = time.perf_counter() - t0
    return out


def width_worker(cfg: dict[str, Any], device: str) -> dict[str, Any]:
    from ccamerge.io.files import Dataset, load_data
    from ccamerge.pipeline import (
        Calibration,
        Progress,
        gather_statistics,
        load_models,
    )

    sampler = RssSampler()
    sampler.start()
    with tempfile.TemporaryDirectory() as tmp:
        loaded = load_models(_random_checkpoints(cfg["arch"], cfg["N"], Path(tmp)))
    calib = load_data(fmnist.write_npz("cifar")["calib"])
    calib = Dataset(calib.x[: cfg["images"]], None, calib.path)
    t0 = time.perf_counter()
    stats = gather_statistics(loaded, Calibration(calib, 250, device), Progress())
    t_stats = time.perf_counter() - t0
    align = _time_methods(loaded, stats, cfg["methods"])
    sampler.stopped = True
    return {
        **cfg,
        "max_d": max(g.size for g in loaded.spec.groups),
        "groups": len(loaded.spec.groups),
        "statistics_seconds": t_stats,
        "align_seconds": align,
        "accumulator_bytes": accumulator_bytes(loaded.spec, cfg["N"]),
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def models_worker(cfg: dict[str, Any], device: str) -> dict[str, Any]:
    from ccamerge.io.files import Dataset, load_data
    from ccamerge.pipeline import Calibration, Progress, gather_statistics, load_models

    loaded = load_models([str(Mdl.checkpoint("mlp", s)) for s in range(cfg["N"])])
    calib = load_data(fmnist.write_npz("flat")["calib"])
    calib = Dataset(calib.x[: cfg["images"]], None, calib.path)
    t0 = time.perf_counter()
    stats = gather_statistics(loaded, Calibration(calib, 500, device), Progress())
    t_stats = time.perf_counter() - t0
    align = _time_methods(loaded, stats, cfg["methods"])
    return {
        **cfg,
        "statistics_seconds": t_stats,
        "align_seconds": align,
        "accumulator_bytes": accumulator_bytes(loaded.spec, cfg["N"]),
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def resnet50_worker(cfg: dict[str, Any], device: str) -> dict[str, Any]:
    from ccamerge.io.files import Dataset, load_data
    from ccamerge.maths.bn import reset_batchnorm
    from ccamerge.methods import AlignContext, make_method
    from ccamerge.pipeline import (
        BatchNormSettings,
        Calibration,
        MergeRecipe,
        Progress,
        build_merged,
        gather_statistics,
        load_models,
    )

    sampler = RssSampler()
    sampler.start()
    with tempfile.TemporaryDirectory() as tmp:
        loaded = load_models(_random_checkpoints("resnet50", 2, Path(tmp)))
    calib = load_data(fmnist.write_npz("cifar")["calib"])
    x = F.interpolate(
        calib.x[: cfg["images"]], size=cfg["size"], mode="bilinear", align_corners=False
    )
    data = Dataset(x, None, "fmnist resized")
    bs = cfg["batch_size"]
    models = [loaded.build(sd, device) for sd in loaded.state_dicts]
    t0 = time.perf_counter()
    with torch.no_grad():
        for m in models:
            for b in data.batches(bs):
                m(b.to(device))
    t_forward = time.perf_counter() - t0
    t0 = time.perf_counter()
    reset_batchnorm(models[0], data.batches(bs), device)
    t_bn = time.perf_counter() - t0
    rss0 = sampler.reset()
    t0 = time.perf_counter()
    stats = gather_statistics(loaded, Calibration(data, bs, device), Progress())
    t_stats = time.perf_counter() - t0
    stats_growth = sampler.peak - rss0
    t0 = time.perf_counter()
    alignment = make_method("cca", gamma=0.1).align(
        AlignContext(loaded.spec, loaded.state_dicts, 0, stats)
    )
    t_align = time.perf_counter() - t0
    t0 = time.perf_counter()
    state, model, bn_done = build_merged(
        loaded,
        MergeRecipe([0.5, 0.5], 0, BatchNormSettings("renorm", True), device, alignment),
        Calibration(data, bs, device),
        stats,
    )
    t_apply = time.perf_counter() - t0
    macs = mac_counts(loaded, x[:1], 2)
    finite = all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    with torch.no_grad():
        out = model(data.x[:4].to(device))
    sampler.stopped = True
    widest = max(loaded.spec.groups, key=lambda g: g.size)
    corr = alignment.groups[widest.name].quality[1]
    return {
        "images": cfg["images"],
        "input size": f"3x{cfg['size']}x{cfg['size']}",
        "feature groups": len(loaded.spec.groups),
        "widest group": f"{widest.name} ({widest.size} units)",
        "activation rows in the widest group": stats.groups[widest.name].n,
        "forward passes of the 2 models (s)": t_forward,
        "BatchNorm-reset pass of one model (s)": t_bn,
        "statistics pass (s)": t_stats,
        "statistics pass / forward passes": t_stats / t_forward,
        "CCA alignment, all groups (s)": t_align,
        "apply + BN renormalisation (s)": t_apply,
        "merge / unavoidable passes": (t_stats + t_align + t_apply) / (t_forward + t_bn),
        "floor of that ratio (multiply-accumulates, cost.mac_counts)": macs["bound"],
        "forward GMAC per image per model": macs["forward_macs"] / 1e9,
        "statistics GMAC per image (2 models)": macs["stats_macs"] / 1e9,
        "float64 accumulators (MiB)": accumulator_bytes(loaded.spec, 2) / 2**20,
        "RSS growth during statistics (MiB)": stats_growth / 2**20,
        "peak RSS (MiB)": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "merged weights finite": bool(finite),
        "merged logits finite": bool(torch.isfinite(out).all()),
        "mean canonical correlation, widest group": corr,
        "BatchNorm": bn_done,
    }


WORKERS = {"width": width_worker, "models": models_worker, "resnet50": resnet50_worker}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--only", nargs="*", default=["width", "models", "resnet50"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--resnet50-size", type=int, default=224)
    p.add_argument("--resnet50-images", type=int, default=64)
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        kind, cfg = args.worker
        print("RESULT " + json.dumps(WORKERS[kind](json.loads(cfg), args.device)), flush=True)
        return

    jobs: list[tuple[str, dict]] = []
    if "width" in args.only:
        for arch in ("resnet20x1", "resnet20x2", "resnet20x4"):
            for n in (2, 4):
                jobs.append(
                    ("width", {"arch": arch, "N": n, "images": 500, "methods": list(METHODS)})
                )
    if "models" in args.only:
        for n in range(2, 7):
            if Mdl.checkpoint("mlp", n - 1).exists():
                jobs.append(
                    ("models", {"arch": "mlp", "N": n, "images": 2000, "methods": list(METHODS)})
                )
    if "resnet50" in args.only:
        jobs.append(
            (
                "resnet50",
                {"images": args.resnet50_images, "size": args.resnet50_size, "batch_size": 16},
            )
        )

    RESULTS.mkdir(exist_ok=True)
    out_path = RESULTS / "scaling.json"
    doc = json.loads(out_path.read_text()) if out_path.exists() else {}
    doc["cpu"] = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in open("/proc/cpuinfo")
            if ln.startswith("model name")
        ),
        "?",
    )
    doc["threads"] = args.threads
    fresh: dict[str, list] = {}
    for kind, cfg in jobs:
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            kind,
            json.dumps(cfg),
            "--threads",
            str(args.threads),
            "--device",
            args.device,
        ]
        t0 = time.perf_counter()
        row = run_worker(cmd, args.threads, f"{kind} {cfg}")
        if row is None:
            continue
        row["loadavg"] = os.getloadavg()
        fresh.setdefault(kind, []).append(row)
        doc[kind] = fresh[kind]  # replace this kind's rows with the new run's
        tmp = out_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        tmp.replace(out_path)
        print(
            f"{kind} {cfg.get('arch', '')} N={cfg.get('N', 2)}: "
            f"{json.dumps({k: v for k, v in row.items() if k not in cfg})} "
            f"({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
