"""The unlabelled check and distillation on Fashion-MNIST (docs/benchmarks.md, "Distillation").

    python benchmarks/distill_bench.py                       # the default plan
    python benchmarks/distill_bench.py --arch resnet20x1 --n 2 --redo

Each row is one ``ccamerge.merge`` in its own subprocess (one torch thread): the default
merge (CCA + refit, the check holding out a tenth of the 2000 calibration images), and the
same merge followed by ``--distill`` with a few budgets, on the calibration images or on
10000 further unlabelled training images (``--distill-data``, written once as a ``.npy``).
A row records the test accuracy (10000 test images) of every input, of their ensemble and
of the merge, the check's held-out agreement of the merge and of every input, the
distillation's report (epochs, forward-pass equivalents) and the merge's timings. Rows are
stored in ``results/distill.json`` by key and kept unless ``--redo``; the table is written
to ``results/distill.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fmnist  # noqa: E402
import models as Mdl  # noqa: E402
from common import run_worker  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CALIB = 2000
EXTRA = 10000  # unlabelled training images for --distill-data
# name -> merge options beyond the defaults
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "distill 5": {"distill": 5},
    "distill auto": {"distill": "auto"},
    "distill auto, flip+crop": {"distill": "auto", "augment": ("flip", "crop")},
    "distill auto, BN frozen": {"distill": "auto", "distill_settings": {"batchnorm": "frozen"}},
    "distill auto, lr 1e-4": {"distill": "auto", "distill_settings": {"lr": 1e-4}},
    "distill auto, lr 1e-4, BN frozen": {
        "distill": "auto",
        "distill_settings": {"lr": 1e-4, "batchnorm": "frozen"},
    },
    "distill 3 on 10000": {"distill": 3, "extra": True},
    "distill auto on 10000": {"distill": "auto", "extra": True},
    "distill auto on 10000, patience 6": {
        "distill": "auto",
        "extra": True,
        "distill_settings": {"patience": 6},
    },
    "distill auto on 10000, lr 1e-4, BN frozen": {
        "distill": "auto",
        "extra": True,
        "distill_settings": {"lr": 1e-4, "batchnorm": "frozen"},
    },
    "distill auto on 10000, flip+crop, lr 1e-4, BN frozen": {
        "distill": "auto",
        "extra": True,
        "augment": ("flip", "crop"),
        "distill_settings": {"lr": 1e-4, "batchnorm": "frozen"},
    },
}
FIRST = [v for v in VARIANTS if "lr 1e-4" not in v and "patience" not in v]  # the defaults
FLAT = [v for v in FIRST if "flip" not in v]  # no image augmentation for flat inputs
VGG = ["default", "distill 5", "distill auto", "distill auto on 10000"]
TUNED = [v for v in VARIANTS if "lr 1e-4" in v]  # a lower learning rate, BatchNorm frozen
PLAN = [  # (arch, N, variants)
    *[("mlp", n, FLAT) for n in (2, 3, 4)],
    ("vgg11q", 2, VGG + TUNED),
    *[("vgg11q", n, VGG) for n in (3, 4)],
    ("resnet20x1", 2, FIRST + TUNED),
    *[("resnet20x1", n, ["default", "distill auto"]) for n in (3, 4)],
    # auto's patience: 3 (the default) against 6, on the 10000 images
    *[(a, 2, ["distill auto on 10000, patience 6"]) for a in ("mlp", "vgg11q", "resnet20x1")],
    *[
        (a, n, ["default", "distill auto on 10000, patience 6"])
        for a in ("mlp", "vgg11q", "resnet20x1")
        for n in (3, 4)
    ],
]


def extra_data(view: str) -> Path:
    """``cache/fmnist_{view}_extra.npy``: 10000 training images (unlabelled), fixed."""
    path = fmnist.CACHE / f"fmnist_{view}_extra.npy"
    if not path.exists():
        data = fmnist.prepare(view)
        idx = fmnist.splits()["train"][-EXTRA:]  # training images, used unlabelled
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, data["train_x"][idx])
        tmp.replace(path)
    return path


def worker(job: dict[str, Any]) -> dict[str, Any]:
    """One merge, evaluated on the test images."""
    import ccamerge

    options = dict(VARIANTS[job["variant"]])
    extra = options.pop("extra", False)
    view = Mdl.view(job["arch"])
    files = fmnist.write_npz(view)
    paths = [str(Mdl.checkpoint(job["arch"], s)) for s in range(job["n"])]
    if extra:
        options["distill_data"] = str(extra_data(view))
    t0 = time.perf_counter()
    result = ccamerge.merge(
        paths,
        data=str(files["calib"]),
        eval_data=str(files["test"]),
        num_samples=CALIB,
        batch_size=250,
        **options,
    )
    report = result.report
    return {
        "seconds": time.perf_counter() - t0,
        "timings": report["timings"],
        "evaluation": {
            "models": [m["accuracy"] for m in report["evaluation"]["models"]],
            "ensemble": report["evaluation"]["ensemble"]["accuracy"],
            "merged": report["evaluation"]["merged"]["accuracy"],
            "merged_loss": report["evaluation"]["merged"]["loss"],
        },
        "check": report["check"],
        "distill": report.get("distill"),
    }


def key(arch: str, n: int, variant: str) -> str:
    return json.dumps([arch, n, variant])


def table(rows: dict[str, dict[str, Any]]) -> str:
    """Markdown: one line per row, accuracies in %, the check's verdict beside the truth."""
    lines = [
        "| model | N | variant | inputs % | best | ensemble | merged | check: merge / best input agreement % | flagged | truly worse | epochs | fwd eq. | merge s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k, r in rows.items():
        arch, n, variant = json.loads(k)
        ev, check, distill = r["evaluation"], r["check"], r["distill"]
        best = max(ev["models"])
        held = [m["top1_agreement"] for m in check["inputs"]]
        epochs = f"{distill['epochs_run']} (kept {distill['epoch_kept']})" if distill else "-"
        work = f"{distill['forward_equivalents']['total']:.0f}" if distill else "-"
        lines.append(
            f"| {arch} | {n} | {variant} | {' / '.join(f'{100 * a:.1f}' for a in ev['models'])} "
            f"| {100 * best:.1f} | {100 * ev['ensemble']:.1f} | **{100 * ev['merged']:.1f}** "
            f"| {100 * check['merged']['top1_agreement']:.1f} / {100 * max(held):.1f} "
            f"| {'yes' if check['beaten_by'] else 'no'} | {'yes' if ev['merged'] < best else 'no'} "
            f"| {epochs} | {work} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def agreement_vs_accuracy(rows: dict[str, dict[str, Any]]) -> str:
    """How well the held-out agreement tracked test accuracy: Pearson r over every model
    (merges and inputs) of a family, and how often the check's verdict was the truth."""
    out = []
    for arch in dict.fromkeys(json.loads(k)[0] for k in rows):
        pairs, verdicts = [], []
        for k, r in rows.items():
            if json.loads(k)[0] != arch:
                continue
            ev, check = r["evaluation"], r["check"]
            pairs.append((check["merged"]["top1_agreement"], ev["merged"]))
            pairs += [(m["top1_agreement"], a) for m, a in zip(check["inputs"], ev["models"])]
            verdicts.append(bool(check["beaten_by"]) == (ev["merged"] < max(ev["models"])))
        a, b = np.array(pairs).T
        r_value = float(np.corrcoef(a, b)[0, 1]) if len(pairs) > 2 else float("nan")
        out.append(
            f"- {arch}: r = {r_value:.3f} over {len(pairs)} models; the check's verdict "
            f"(flagged / not flagged) matched the test accuracy in {sum(verdicts)} of "
            f"{len(verdicts)} merges"
        )
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", nargs="*", help="only these families")
    p.add_argument("--n", nargs="*", type=int, help="only these N")
    p.add_argument("--variant", nargs="*", help="only these variants")
    p.add_argument("--redo", action="store_true", help="recompute stored rows")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--store", default="distill.json", help="the results file in results/")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    store = RESULTS / args.store
    rows = json.loads(store.read_text()) if store.exists() else {}
    for arch, n, variants in PLAN:
        if (args.arch and arch not in args.arch) or (args.n and n not in args.n):
            continue
        for variant in variants:
            if args.variant and variant not in args.variant:
                continue
            k = key(arch, n, variant)
            if k in rows and not args.redo:
                continue
            job = json.dumps({"arch": arch, "n": n, "variant": variant})
            cmd = [sys.executable, __file__, "--worker", job]
            row = run_worker(cmd, args.threads, k)
            if row is not None:
                rows[k] = row
                store.write_text(json.dumps(rows, indent=1))
                print(f"{k}: merged {100 * row['evaluation']['merged']:.2f} %, "
                      f"{row['seconds']:.0f} s", flush=True)  # fmt: skip
    ordered = {
        key(a, n, v): rows[key(a, n, v)] for a, n, vs in PLAN for v in vs if key(a, n, v) in rows
    }
    tables = table(ordered) + "\n" + agreement_vs_accuracy(ordered)
    (RESULTS / Path(args.store).with_suffix(".md").name).write_text(tables)


if __name__ == "__main__":
    main()
