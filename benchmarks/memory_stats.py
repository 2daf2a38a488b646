"""Peak memory of the statistics pass against the number of calibration samples.

``collect_statistics`` streams: it holds one batch of activations and the
float64 accumulators (O((N d)^2) per group), never the activations of all
samples. This benchmark checks that claim: for each model and sample count it
starts a fresh Python process, builds N=2 models, and runs the statistics pass
over batches generated on the fly (seeded Gaussian inputs, so that the data set
itself does not occupy memory and only the pass is measured). It reports

* ``RSS before``: resident memory after building the models, before the pass;
* ``peak RSS``: the process's high-water mark during the pass (``VmHWM``, reset
  through ``/proc/self/clear_refs`` just before the pass; without that file,
  ``getrusage``'s lifetime ``ru_maxrss``);
* ``growth``: peak minus before, i.e. what the pass itself needed;
* ``accumulators``: the exact float64 bytes of the returned statistics;
* ``Python heap peak``: tracemalloc's peak (Python objects only; torch's
  tensor memory is not traced, which is why RSS is the main measure).

Usage::

    python benchmarks/memory_stats.py                 # mlp and resnet_cifar, 1k/4k/16k
    python benchmarks/memory_stats.py --arch mlp --samples 1000 64000

Prints a markdown table on stdout (progress on stderr).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import blas_env  # noqa: E402

MiB = 1024 * 1024


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def build(arch: str, n_models: int, side: int):
    """``n_models`` seeded models of ``arch``, their merge spec, and the per-sample shape."""
    import torch

    from ccamerge.models.archs.mlp import MLP
    from ccamerge.models.registry import get_architecture

    models = []
    if arch == "mlp":
        sizes = [784, 512, 512, 10]
        for seed in range(n_models):
            torch.manual_seed(seed)
            models.append(MLP(sizes))
        entry = get_architecture("mlp")
        config = {"layout": "ccamerge", "indices": [0, 1, 2], "sizes": sizes, "bias": True}
        return models, entry.spec(config), (784,), "MLP 784-512-512-10"
    if arch == "resnet_cifar":
        from ccamerge.models.archs.resnet_cifar import cifar_resnet_config

        entry = get_architecture("resnet_cifar")
        config = cifar_resnet_config(depth=20, width=1, num_classes=10)
        for seed in range(n_models):
            torch.manual_seed(seed)
            models.append(entry.build(config))
        return models, entry.spec(config), (3, side, side), f"ResNet20 (CIFAR), {side}x{side}"
    raise SystemExit(f"unknown arch {arch!r} (mlp or resnet_cifar)")


def child(arch: str, samples: int, batch_size: int, side: int, n_models: int, threads: int) -> dict:
    """One measurement, in this (fresh) process."""
    import torch

    from ccamerge.maths.stats import collect_statistics

    torch.set_num_threads(threads)
    models, spec, shape, label = build(arch, n_models, side)

    def batches():
        gen = torch.Generator().manual_seed(0)
        for start in range(0, samples, batch_size):
            b = min(batch_size, samples - start)
            yield torch.randn((b, *shape), generator=gen)

    # warm up torch's kernels on one small batch so the first real batch is not special
    with torch.no_grad():
        for m in models:
            m.eval()(torch.zeros((2, *shape)))
    rss_before = _status_kib("VmRSS")
    exact_peak = _reset_peak()
    tracemalloc.start()
    t0 = time.perf_counter()
    stats = collect_statistics(models, spec, batches(), "cpu")
    seconds = time.perf_counter() - t0
    py_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    peak = _status_kib("VmHWM") if exact_peak else None
    if peak is None:  # ru_maxrss: KiB on Linux, the whole process lifetime
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    acc = [jc for jc in stats.groups.values()] + [
        jc for per_model in stats.norms.values() for jc in per_model
    ]
    accumulators = sum(jc.nbytes for jc in acc)
    return {
        "model": label,
        "samples": stats.num_samples,
        "seconds": seconds,
        "rss_before": rss_before * 1024 if rss_before else None,
        "peak_rss": peak * 1024,
        "exact_peak": exact_peak,
        "accumulators": accumulators,
        "python_peak": py_peak,
    }


def measure(
    arch: str, samples: int, batch_size: int, side: int, n_models: int, threads: int
) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--arch",
        arch,
        "--samples",
        str(samples),
        "--batch-size",
        str(batch_size),
        "--side",
        str(side),
        "--models",
        str(n_models),
        "--threads",
        str(threads),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=blas_env(threads))
    if out.returncode != 0:
        raise SystemExit(f"measurement failed ({arch}, {samples}):\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict], batch_size: int, n_models: int) -> str:
    lines = [
        f"N = {n_models} models, batch size {batch_size}, float32 inputs generated per batch.",
        "",
        "| model | samples | time (s) | RSS before (MiB) | peak RSS (MiB) | growth (MiB) "
        "| accumulators (MiB) | Python heap peak (MiB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        before = r["rss_before"] / MiB if r["rss_before"] else float("nan")
        growth = (r["peak_rss"] - r["rss_before"]) / MiB if r["rss_before"] else float("nan")
        mark = "" if r["exact_peak"] else " *"
        lines.append(
            f"| {r['model']} | {r['samples']} | {r['seconds']:.1f} | {before:.0f} | "
            f"{r['peak_rss'] / MiB:.0f}{mark} | {growth:.0f} | {r['accumulators'] / MiB:.1f} | "
            f"{r['python_peak'] / MiB:.2f} |"
        )
    if not all(r["exact_peak"] for r in rows):
        lines += ["", "\\* lifetime ru_maxrss (no /proc/self/clear_refs on this system)"]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", nargs="+", default=["mlp", "resnet_cifar"])
    p.add_argument("--samples", nargs="+", type=int, default=[1000, 4000, 16000])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--side", type=int, default=32, help="image side for conv nets")
    p.add_argument("--models", type=int, default=2, help="number of models N")
    p.add_argument("--threads", type=int, default=1, help="torch (and BLAS) threads")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        r = child(
            args.arch[0], args.samples[0], args.batch_size, args.side, args.models, args.threads
        )
        print(json.dumps(r))
        return
    rows = []
    for arch in args.arch:
        for n in args.samples:
            print(f"measuring {arch} with {n} samples ...", file=sys.stderr, flush=True)
            rows.append(measure(arch, n, args.batch_size, args.side, args.models, args.threads))
    print(table(rows, args.batch_size, args.models))


if __name__ == "__main__":
    main()
