"""Merged accuracy on Fashion-MNIST: every registered method, N = 2, 3, 4, several model groups.

    python benchmarks/run_merges.py --arch resnet20x1 --n 2 3 4
    python benchmarks/run_merges.py --arch mlp_split          # the disjoint (class-split) setting

For each architecture, each N and each model group (a set of N seeds; the first
is the reference), the script

1. loads the checkpoints with ``ccamerge.pipeline.load_models`` (the CLI's path);
2. evaluates each base model once on the 10000 test images (logits cached per
   seed) and their ensemble (mean of logits);
3. gathers the calibration statistics with ``ccamerge.pipeline.gather_statistics``
   on the first 500, 2000 and 10000 images of the calibration set, nested: the
   2000-sample statistics are the 500-sample ones plus a pass over images
   500..1999 (``JointCovariance.merge``), so each image is run through the
   models once;
4. for each configuration (method, parameters, calibration size, BN mode, BN
   reset on/off) aligns with ``make_method(...).align(AlignContext(...))`` (one
   alignment per method and calibration size, shared by the BN variants), builds
   the merged model with ``ccamerge.pipeline.build_merged`` (BatchNorm reset or
   renormalised on the same calibration images), and evaluates it.

Results (one JSON row per merge, with timings) go to
``benchmarks/results/merges_{arch}.json``; ``make_tables.py`` turns them into
the tables of docs/benchmarks.md. Rows of a configuration already in the file
are kept and new ones appended, so a run can be extended; ``--redo`` starts the
file afresh, so that every row in it comes from the same run.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fmnist  # noqa: E402
import models as Mdl  # noqa: E402

from ccamerge.io.files import Dataset, load_data  # noqa: E402
from ccamerge.maths.stats import Statistics  # noqa: E402
from ccamerge.methods import AlignContext, list_methods, make_method  # noqa: E402
from ccamerge.pipeline import (  # noqa: E402
    REFIT_GAMMA,
    BatchNormSettings,
    Calibration,
    MergeRecipe,
    Progress,
    RefitSettings,
    build_merged,
    ensemble_logits,
    gather_statistics,
    load_models,
    predict_logits,
    refit_merged,
    resolve_bn_mode,
    score_logits,
)

RESULTS = Path(__file__).resolve().parent / "results"
CALIB_SIZES = (100, 500, 2000, 10000)
DEFAULT_N = 2000  # calibration images for everything but the CCA sample-size sweep

# seeds available per architecture (what train_models.py trains)
SEEDS = {
    "mlp": [0, 1, 2, 3, 4, 5],
    "resnet20x1": [0, 1, 2, 3],
    "vgg11q": [0, 1, 2, 3],
    "resnet20x2": [0, 1, 2, 3],
}
SPLIT_SEEDS = [0, 1, 2]


def machine() -> dict[str, Any]:
    model = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except OSError:
        commit = "?"
    return {
        "ccamerge_commit": commit,
        "cpu": model,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "loadavg_start": os.getloadavg(),
    }


def model_groups(seeds: list[int], n: int, count: int) -> list[list[int]]:
    """``count`` groups of ``n`` seeds: evenly spread combinations; when there are fewer
    combinations than ``count``, the same models with the reference rotated."""
    combos = [list(c) for c in itertools.combinations(seeds, n)]
    if len(combos) >= count:
        step = (len(combos) - 1) / max(count - 1, 1)
        return [combos[round(i * step)] for i in range(count)]
    out = []
    for r in range(n):
        for c in combos:
            if len(out) < count:
                out.append(c[r:] + c[:r])
    return out


def configs(has_bn: bool, n_models: int, full: bool) -> list[dict[str, Any]]:
    """The merges run for one model group.

    Every method with its default BN handling (``bn_mode="auto"``: vector for
    permutation methods and averaging, renorm otherwise) at 2000 samples. With BatchNorm:
    CCA with the vector BN treatment too. Without BatchNorm, ``renorm`` means REPAIR
    (``ccamerge.maths.repair``): CCA without it (vector) and Permute with it, for comparison.
    ``full`` (the N of ``--full-for``, default 2) adds every method without the BN reset
    and the CCA calibration-size sweep. CCA uses the library's fixed default ridge
    (gamma 0.1, relative); gamma="auto" is measured by benchmarks/auto_vs_fixed.py.

    Every method also runs with the refit (``refit: True``; no separate BatchNorm pass,
    the refit writes the statistics; CCA with its ridge under the refit, REFIT_GAMMA),
    and with ``full`` the refit of CCA at every calibration size."""
    out = []
    for m in list_methods():
        out.append({"method": m, "n": DEFAULT_N, "bn_mode": "auto", "reset_bn": True})
        out.append(refit_config(m, DEFAULT_N))
        if has_bn and full:
            out.append({"method": m, "n": DEFAULT_N, "bn_mode": "auto", "reset_bn": False})
    if has_bn:
        out.append({"method": "cca", "n": DEFAULT_N, "bn_mode": "vector", "reset_bn": True})
    else:
        out.append({"method": "cca", "n": DEFAULT_N, "bn_mode": "vector", "reset_bn": True})
        out.append({"method": "permute", "n": DEFAULT_N, "bn_mode": "renorm", "reset_bn": True})
    if full:
        for n in CALIB_SIZES:
            if n != DEFAULT_N:
                out.append({"method": "cca", "n": n, "bn_mode": "auto", "reset_bn": True})
                out.append(refit_config("cca", n))
    return out


def refit_config(method: str, n: int) -> dict[str, Any]:
    params = {"gamma": REFIT_GAMMA} if method == "cca" else {}
    return {"method": method, "params": params, "n": n, "reset_bn": False, "refit": True}


def nested_statistics(loaded, calib: Dataset, sizes, bs, device) -> tuple[dict, dict]:
    """Statistics on calib[:n] for each n in ``sizes`` with one pass over calib[:max]."""
    out, seconds, done, acc = {}, {}, 0, None
    t_total = 0.0
    for n in sorted(sizes):
        part = Dataset(calib.x[done:n], None, calib.path)
        t0 = time.perf_counter()
        new = gather_statistics(loaded, Calibration(part, bs, device), Progress())
        if acc is None:
            acc = new
        else:
            for g, jc in acc.groups.items():
                jc.merge(new.groups[g])
            for bn, lst in acc.norms.items():
                for a, b in zip(lst, new.norms[bn]):
                    a.merge(b)
            acc.num_samples += new.num_samples
        t_total += time.perf_counter() - t0
        out[n] = copy.deepcopy(acc)
        seconds[n] = t_total
        done = n
    return out, seconds


def half_accuracy(logits: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    pred = logits.argmax(1)
    lo = y < 5
    return {
        "acc_0_4": float((pred[lo] == y[lo]).float().mean()),
        "acc_5_9": float((pred[~lo] == y[~lo]).float().mean()),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--arch",
        required=True,
        help="mlp, resnet20x1, resnet20x2, vgg11q, or mlp_split (disjoint setting)",
    )
    p.add_argument("--n", nargs="*", type=int, default=[2, 3, 4], help="models per merge")
    p.add_argument("--groups", type=int, default=3, help="model groups per N")
    p.add_argument(
        "--full-for",
        nargs="*",
        type=int,
        default=[2],
        help="N for which every configuration runs (BN off, CCA vector, sizes)",
    )
    p.add_argument("--sizes", nargs="*", type=int, default=list(CALIB_SIZES))
    p.add_argument(
        "--sizes-only",
        action="store_true",
        help=f"only the configurations at --sizes (default: also every one at {DEFAULT_N})",
    )
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--redo", action="store_true", help="recompute rows already in the file")
    p.add_argument(
        "--suffix",
        default="",
        help="results file merges_{arch}{suffix}.json (for runs in parallel)",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dev = args.device

    split = args.arch == "mlp_split"
    arch = "mlp" if split else args.arch
    paths = fmnist.write_npz(Mdl.view(arch))
    calib_all = load_data(paths["calib"])
    test = load_data(paths["test"], require_labels=True)
    sizes = sorted(set(args.sizes) | (set() if args.sizes_only else {DEFAULT_N}))

    if split:
        # N = 2: one A (classes 0-4) and one B model per seed; N = 3, 4: both halves
        # several times (A0 B0 A1, A0 B0 A1 B1)
        pairs = [[("A", s), ("B", s)] for s in SPLIT_SEEDS]
        groups_by_n = {2: pairs, 3: [pairs[0] + pairs[1][:1]], 4: [pairs[0] + pairs[1]]}
    else:
        groups_by_n = {
            n: [[(None, s) for s in g] for g in model_groups(SEEDS[arch], n, args.groups)]
            for n in args.n
            if n <= len(SEEDS[arch])
        }

    RESULTS.mkdir(exist_ok=True)
    out_path = RESULTS / f"merges_{args.arch}{args.suffix}.json"
    # --redo starts the file afresh: its rows are then all from this run (this code)
    keep = out_path.exists() and not args.redo
    doc = json.loads(out_path.read_text()) if keep else {"rows": []}
    doc["machine"] = machine()
    done_keys = {r["key"] for r in doc["rows"]}
    base_logits: dict[tuple, torch.Tensor] = {}

    def save() -> None:
        tmp = out_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        tmp.replace(out_path)

    for n_models, groups in groups_by_n.items():
        for members in groups:
            ckpts = [str(Mdl.checkpoint(arch, s, split=h)) for h, s in members]
            missing = [c for c in ckpts if not Path(c).exists()]
            if missing:
                print(f"skip {members}: missing {missing} (run train_models.py)", flush=True)
                continue
            tag = [f"{h or ''}{s}" for h, s in members]
            full = n_models in args.full_for
            loaded = load_models(ckpts)
            has_bn = any(k.endswith("running_var") for k in loaded.state_dicts[0])
            todo = [
                c
                for c in configs(has_bn, n_models, full)
                if c["n"] in sizes and json.dumps([tag, c]) not in done_keys
            ]
            if not todo:
                print(f"{args.arch} N={n_models} {tag}: all done", flush=True)
                continue
            t0 = time.perf_counter()
            for (h, s), sd, ck in zip(members, loaded.state_dicts, ckpts):
                if (h, s) not in base_logits:  # cached on disk next to the checkpoint
                    cache = Path(ck).with_suffix(".test_logits.pt")
                    if cache.exists() and cache.stat().st_mtime > Path(ck).stat().st_mtime:
                        base_logits[(h, s)] = torch.load(cache)
                    else:
                        lg = predict_logits(loaded.build(sd, dev), test, 1000, dev)
                        torch.save(lg, cache)
                        base_logits[(h, s)] = lg
            logits = [base_logits[m] for m in members]
            t_base = time.perf_counter() - t0
            base = [score_logits(lg, test.y).accuracy for lg in logits]
            ens = ensemble_logits(logits)
            ens_acc = score_logits(ens, test.y).accuracy
            extra = {}
            if split:
                extra = {
                    "base_halves": [half_accuracy(lg, test.y) for lg in logits],
                    "ensemble_halves": half_accuracy(ens, test.y),
                }
            need = sorted({c["n"] for c in todo})
            stats, stat_seconds = (
                nested_statistics(loaded, calib_all, need, args.batch_size, dev)
                if need
                else ({}, {})
            )
            print(
                f"{args.arch} N={n_models} {tag}: base {[round(a, 4) for a in base]}, "
                f"ensemble {ens_acc:.4f}; statistics {stat_seconds} s, base eval {t_base:.1f} s",
                flush=True,
            )
            alignments: dict[tuple, Any] = {}
            weights = [1.0 / n_models] * n_models
            for c in todo:
                method = make_method(c["method"], **c.get("params", {}))
                key = (c["method"], json.dumps(method.params()), c["n"])
                st: Statistics = stats[c["n"]]
                if key not in alignments:
                    t0 = time.perf_counter()
                    alignments[key] = method.align(
                        AlignContext(loaded.spec, loaded.state_dicts, 0, st)
                    )
                    alignments[key + ("t",)] = time.perf_counter() - t0
                bn_mode = resolve_bn_mode(c.get("bn_mode", "auto"), method)
                calib = Dataset(calib_all.x[: c["n"]], None, calib_all.path)
                t0 = time.perf_counter()
                _, model, bn_done = build_merged(
                    loaded,
                    MergeRecipe(
                        weights, 0, BatchNormSettings(bn_mode, c["reset_bn"]), dev, alignments[key]
                    ),
                    Calibration(calib, args.batch_size, dev),
                    st,
                )
                t_apply = time.perf_counter() - t0
                t_refit, refit_summary = 0.0, None
                if c.get("refit"):
                    t0 = time.perf_counter()
                    fitted = refit_merged(
                        loaded,
                        MergeRecipe(weights, 0, device=dev, alignment=alignments[key]),
                        model,
                        Calibration(calib, args.batch_size, dev),
                        RefitSettings(),
                    )
                    t_refit = time.perf_counter() - t0
                    bn_done = "written by the refit"
                    refit_summary = {
                        "mode": fitted.mode,
                        "ridge": fitted.ridge,
                        "layers": len(fitted.layers),
                        "warnings": fitted.warnings,
                    }
                t0 = time.perf_counter()
                lg = predict_logits(model, test, 1000, dev)
                t_eval = time.perf_counter() - t0
                sc = score_logits(lg, test.y)
                row = {
                    "key": json.dumps([tag, c]),
                    "arch": args.arch,
                    "N": n_models,
                    "models": tag,
                    **c,
                    "bn_mode": bn_mode,
                    "has_bn": has_bn,
                    "batchnorm": bn_done,
                    "params": method.params(),
                    "refit": refit_summary,
                    "accuracy": sc.accuracy,
                    "loss": sc.loss,
                    "base": base,
                    "ensemble": ens_acc,
                    **extra,
                    "seconds": {
                        "statistics_nested": stat_seconds[c["n"]],
                        "alignment": alignments[key + ("t",)],
                        "apply_and_bn": t_apply,
                        "refit": t_refit,
                        "evaluate": t_eval,
                    },
                }
                if split:
                    row["halves"] = half_accuracy(lg, test.y)
                doc["rows"] = [r for r in doc["rows"] if r["key"] != row["key"]]
                doc["rows"].append(row)
                save()
                print(
                    f"  {c['method']:15s} n={c['n']:5d} bn={row['bn_mode']:6s} "
                    f"reset={c['reset_bn']!s:5s} refit={bool(c.get('refit'))!s:5s} "
                    f"acc {sc.accuracy:.4f}  (align {alignments[key + ('t',)]:.2f} s, "
                    f"apply {t_apply:.2f} s, refit {t_refit:.2f} s)",
                    flush=True,
                )
    doc["machine"]["loadavg_end"] = os.getloadavg()
    save()


if __name__ == "__main__":
    main()
