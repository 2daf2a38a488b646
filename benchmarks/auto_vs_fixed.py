"""``--gamma auto`` and ``--method auto`` against every fixed choice (issue 9, part 2).

    python benchmarks/auto_vs_fixed.py --arch mlp --seeds 0 1
    python benchmarks/auto_vs_fixed.py --arch resnet20x1 --seeds 0 1 --test 2000
    python benchmarks/auto_vs_fixed.py --arch mlp_split --seeds 0 0      # disjoint: A0 + B0

For one model group this reproduces what ``ccamerge merge`` does, with the library's own
pieces, while scoring every candidate on the test set as well:

* fixed choice: statistics and BatchNorm reset on the first 2000 calibration images
  (what ``--method X --gamma g`` does), merged and scored on the test images;
* automatic choice: :func:`ccamerge.pipeline.split_heldout` (seed 0, 20%) splits the same
  2000 images into 1600 for statistics/BN and 400 held out; every candidate of
  :func:`ccamerge.pipeline.candidate_methods` is merged from the 1600 and scored on the 400
  by KL to the ensemble (:func:`ccamerge.pipeline.score_outputs`); ``gamma auto`` is the
  best CCA candidate, ``method auto`` the best of all. Their test accuracy is that of the
  winner merged from the 1600 (exactly what ``run_merge`` returns).

Cost of selection = the sum over candidates of alignment + merge + BN reset + held-out
forward pass, plus the ensemble's held-out pass (measured, seconds).
Results: ``benchmarks/results/auto_{arch}_n{N}.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fmnist  # noqa: E402
import models as Mdl  # noqa: E402
from common import top1 as acc  # noqa: E402

from ccamerge.io.files import load_data  # noqa: E402
from ccamerge.methods import AlignContext, make_method  # noqa: E402
from ccamerge.pipeline import (  # noqa: E402
    BatchNormSettings,
    Calibration,
    MergeRecipe,
    Progress,
    build_merged,
    candidate_methods,
    ensemble_logits,
    gather_statistics,
    label,
    load_models,
    predict_logits,
    resolve_bn_mode,
    score_outputs,
    split_heldout,
)

RESULTS = Path(__file__).resolve().parent / "results"
CALIB = 2000
BS = 256


def paths_for(arch: str, seeds: list[int]) -> list[str]:
    if arch == "mlp_split":  # disjoint: first model from split A, the others from split B
        return [str(Mdl.checkpoint("mlp", s, "A" if i == 0 else "B")) for i, s in enumerate(seeds)]
    return [str(Mdl.checkpoint(arch, s)) for s in seeds]


def run(arch: str, seeds: list[int], n_test: int) -> dict[str, Any]:
    loaded = load_models(paths_for(arch, seeds))
    view = fmnist.write_npz(Mdl.view(arch.split("_")[0]))
    calib = load_data(view["calib"]).subset(CALIB)
    test = load_data(view["test"]).subset(n_test)
    N = len(seeds)
    w = [1.0 / N] * N
    logits = [predict_logits(loaded.build(sd), test, BS, "cpu") for sd in loaded.state_dicts]
    split = split_heldout(Calibration(calib, BS, "cpu"), 0.2, 0)
    t0 = time.perf_counter()
    full = gather_statistics(loaded, Calibration(calib, BS, "cpu"), Progress())
    t_full = time.perf_counter() - t0
    t0 = time.perf_counter()
    part = gather_statistics(loaded, split.stats, Progress())
    t_part = time.perf_counter() - t0
    t0 = time.perf_counter()
    held = split.heldout.data
    ens_held = ensemble_logits(
        [predict_logits(loaded.build(sd), held, BS, "cpu") for sd in loaded.state_dicts], w
    )
    t_ens = time.perf_counter() - t0
    candidates = candidate_methods("auto", {})
    fixed_only = [make_method("average"), make_method("weight-matching")]
    rows = []
    for method in candidates + fixed_only:
        bn_mode = resolve_bn_mode("auto", method)
        row: dict[str, Any] = {
            "candidate": label(method),
            "method": method.name,
            "params": method.params(),
            "bn_mode": bn_mode,
        }
        t0 = time.perf_counter()
        alignment = method.align(AlignContext(loaded.spec, loaded.state_dicts, 0, full))
        _, model, _ = build_merged(
            loaded,
            MergeRecipe(w, 0, BatchNormSettings(bn_mode, True), "cpu", alignment),
            Calibration(calib, BS, "cpu"),
            full,
        )
        row["seconds_fixed_merge"] = time.perf_counter() - t0
        row["fixed_accuracy"] = acc(predict_logits(model, test, BS, "cpu"), test.y)
        if method in candidates:
            t0 = time.perf_counter()
            alignment = method.align(AlignContext(loaded.spec, loaded.state_dicts, 0, part))
            _, model, _ = build_merged(
                loaded,
                MergeRecipe(w, 0, BatchNormSettings(bn_mode, True), "cpu", alignment),
                split.stats,
                part,
            )
            s, kl, agree, _ = score_outputs(
                predict_logits(model, held, BS, "cpu"), ens_held, None, "agreement"
            )
            row["seconds_candidate"] = time.perf_counter() - t0
            row.update(heldout_kl=kl, heldout_agreement=agree)
            row["split_accuracy"] = acc(predict_logits(model, test, BS, "cpu"), test.y)
        rows.append(row)
        print(json.dumps(row), flush=True)
    cand = [r for r in rows if "heldout_kl" in r]
    cca = [r for r in cand if r["method"] == "cca"]
    g_auto = min(cca, key=lambda r: r["heldout_kl"])
    m_auto = min(cand, key=lambda r: r["heldout_kl"])
    return {
        "arch": arch,
        "seeds": seeds,
        "N": N,
        "calib": CALIB,
        "heldout": len(held),
        "test_images": len(test),
        "base": [acc(lg, test.y) for lg in logits],
        "ensemble": acc(ensemble_logits(logits, w), test.y),
        "rows": rows,
        "gamma_auto": {
            "winner": g_auto["candidate"],
            "accuracy": g_auto["split_accuracy"],
            "selection_seconds": t_ens + sum(r["seconds_candidate"] for r in cca),
        },
        "method_auto": {
            "winner": m_auto["candidate"],
            "accuracy": m_auto["split_accuracy"],
            "selection_seconds": t_ens + sum(r["seconds_candidate"] for r in cand),
        },
        "seconds_statistics": {
            "full_2000": t_full,
            "split_1600": t_part,
            "ensemble_heldout": t_ens,
        },
        "machine": {
            "cores": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "loadavg": os.getloadavg(),
        },
    }


def table() -> str:
    """Markdown table of every ``auto_*.json`` (accuracy in %, test images as stored)."""
    fixed = ["average", "permute", "weight-matching", "zipit"]
    head = (
        "| models | N | test | ensemble | " + " | ".join(fixed) + " | cca γ=0.1 | best fixed γ "
        "| γ auto (pick) | method auto (pick) | selection s (γ / method) | statistics s |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for path in sorted(RESULTS.glob("auto_*_n*.json")):
        d = json.loads(path.read_text())
        by = {r["method"]: r for r in d["rows"] if r["method"] != "cca"}
        cca = [r for r in d["rows"] if r["method"] == "cca"]
        g01 = next(r for r in cca if r["params"]["gamma"] == 0.1)
        best = max(cca, key=lambda r: r["fixed_accuracy"])

        def pct(x: float) -> str:
            return f"{100 * x:.1f}"

        def pick(a: dict) -> str:
            return f"{pct(a['accuracy'])} ({a['winner'].replace(', ridge=relative', '')})"

        cells = [
            d["arch"],
            str(d["N"]),
            str(d["test_images"]),
            pct(d["ensemble"]),
            *(pct(by[m]["fixed_accuracy"]) for m in fixed),
            pct(g01["fixed_accuracy"]),
            f"{pct(best['fixed_accuracy'])} (γ={best['params']['gamma']})",
            pick(d["gamma_auto"]),
            pick(d["method_auto"]),
            f"{d['gamma_auto']['selection_seconds']:.1f} / "
            f"{d['method_auto']['selection_seconds']:.1f}",
            f"{d['seconds_statistics']['full_2000']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="mlp")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--test", type=int, default=10000)
    ap.add_argument("--table", action="store_true", help="print the markdown table and exit")
    args = ap.parse_args()
    if args.table:
        print(table())
        return
    torch.set_num_threads(1)
    torch.manual_seed(0)
    out = run(args.arch, args.seeds, args.test)
    (RESULTS / f"auto_{args.arch}_n{len(args.seeds)}.json").write_text(json.dumps(out, indent=1))
    print(json.dumps({k: out[k] for k in ("gamma_auto", "method_auto", "ensemble", "base")}))


if __name__ == "__main__":
    main()
