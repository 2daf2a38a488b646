"""Merging CNN families that are not in the registry (docs/benchmarks.md, "CNN families").

    python benchmarks/train_models.py --only mobilenet convnext densenet
    python benchmarks/cnn_bench.py                     # the whole plan
    python benchmarks/cnn_bench.py --family densenet --n 2 --redo

The families of ``cnn_zoo.py`` are merged as a user's own models (``--model``), their
feature groups discovered by tracing. Each row is one ``ccamerge.merge`` in its own
subprocess (one torch thread): every method with and without the refit, on the first 2000
calibration images (the check holding out a tenth), N = 2 and 4 seeds, and the default
merge followed by ``--distill 3``, ``--distill 10`` or ``--distill auto`` on 10000 further
unlabelled training images (``distill_bench.extra_data``). A row records the
test accuracy (10000 test images) of every input, of their ensemble and of the merge, the
fraction of parameters aligned, the check's verdict and the merge's wall time. Rows are
stored in ``results/cnn_zoo.json`` (or ``--store NAME.json``) by key and kept unless
``--redo``; the table is written beside it as ``.md`` (``make_tables.py`` copies
``cnn_zoo.md`` into docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fmnist  # noqa: E402
import models as Mdl  # noqa: E402
from common import run_worker  # noqa: E402
from distill_bench import extra_data  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CALIB = 2000
FAMILIES = ("mobilenet", "convnext", "densenet")
METHODS = ("cca", "average", "permute", "weight-matching", "zipit")
DISTILL_EPOCHS = (3, 10, "auto")
DISTILLED = {f"cca, distill {e} on 10000": e for e in DISTILL_EPOCHS}  # default merge, distilled
PLAN = [
    (f, n, m, refit)
    for f in FAMILIES
    for n in (2, 4)
    for m, refit in [*((m, r) for m in METHODS for r in (1, 0)), *((d, 1) for d in DISTILLED)]
]


def worker(job: dict[str, Any]) -> dict[str, Any]:
    """One merge, evaluated on the test images."""
    import ccamerge

    files = fmnist.write_npz("cifar")
    paths = [str(Mdl.checkpoint(job["family"], s)) for s in range(job["n"])]
    epochs = DISTILLED.get(job["method"])
    distilled = epochs is not None
    options = {"distill": epochs, "distill_data": str(extra_data("cifar"))} if distilled else {}
    t0 = time.perf_counter()
    result = ccamerge.merge(
        paths,
        model=Mdl.ZOO_MODEL,
        model_args={"name": job["family"]},
        data=str(files["calib"]),
        eval_data=str(files["test"]),
        num_samples=CALIB,
        batch_size=250,
        method="cca" if distilled else job["method"],
        refit=bool(job["refit"]),
        device=job.get("device", "cpu"),
        **options,
    )
    report = result.report
    evaluation = report["evaluation"]
    return {
        "seconds": time.perf_counter() - t0,
        "models": [m["accuracy"] for m in evaluation["models"]],
        "ensemble": evaluation["ensemble"]["accuracy"],
        "merged": evaluation["merged"]["accuracy"],
        "aligned": report["aligned"]["fraction"],
        "kept_averaged": report["aligned"]["kept_averaged"],
        "flagged": bool(report["check"]["beaten_by"]),
        "warnings": report["warnings"],
    }


def key(family: str, n: int, method: str, refit: int) -> str:
    return json.dumps([family, n, method, refit])


def table(rows: dict[str, dict[str, Any]]) -> str:
    """Markdown: one line per merge, accuracies in %; the default merge (cca + refit) bold."""
    lines = [
        "| family | N | method | refit | inputs % | best | ensemble | merged | vs best | vs ensemble | aligned % | check flags | merge s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k, r in rows.items():
        family, n, method, refit = json.loads(k)
        best = max(r["models"])
        merged = f"{100 * r['merged']:.1f}"
        if method.startswith("cca") and refit:  # the default merge, and it distilled
            merged = f"**{merged}**"
        lines.append(
            f"| {family} | {n} | {method} | {'yes' if refit else 'no'} "
            f"| {' / '.join(f'{100 * a:.1f}' for a in r['models'])} | {100 * best:.1f} "
            f"| {100 * r['ensemble']:.1f} | {merged} | {100 * (r['merged'] - best):+.1f} "
            f"| {100 * (r['merged'] - r['ensemble']):+.1f} | {100 * r['aligned']:.0f} "
            f"| {'yes' if r['flagged'] else 'no'} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", nargs="*", help="only these families")
    p.add_argument("--n", nargs="*", type=int, help="only these N")
    p.add_argument("--method", nargs="*", help="only these methods")
    p.add_argument("--redo", action="store_true", help="recompute stored rows")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--store", default="cnn_zoo.json", help="the results file in results/")
    p.add_argument("--device", default="cpu")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    store = RESULTS / args.store
    rows = json.loads(store.read_text()) if store.exists() else {}
    for family, n, method, refit in PLAN:
        if (
            (args.family and family not in args.family)
            or (args.n and n not in args.n)
            or (args.method and method not in args.method)
        ):
            continue
        k = key(family, n, method, refit)
        if k in rows and not args.redo:
            continue
        job = {"family": family, "n": n, "method": method, "refit": refit, "device": args.device}
        row = run_worker([sys.executable, __file__, "--worker", json.dumps(job)], args.threads, k)
        if row is not None:
            rows[k] = row
            store.write_text(json.dumps(rows, indent=1))
            print(f"{k}: merged {100 * row['merged']:.2f} %, aligned "
                  f"{100 * row['aligned']:.0f} %, {row['seconds']:.0f} s", flush=True)  # fmt: skip
    ordered = {key(*c): rows[key(*c)] for c in PLAN if key(*c) in rows}
    (RESULTS / Path(args.store).with_suffix(".md").name).write_text(table(ordered))


if __name__ == "__main__":
    main()
