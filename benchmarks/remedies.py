"""Remedies for CCA on narrow networks (issue 9), measured on the cached Fashion-MNIST models.

    python benchmarks/remedies.py --arch mlp --seeds 0 1
    python benchmarks/remedies.py --arch mlp --seeds 0 1 2 3
    python benchmarks/remedies.py --arch resnet20x1 --seeds 0 1 --test 2000
    python benchmarks/remedies.py --bn-check            # BN reset: train-mode vs eval-mode fix

Every merge uses the first 2000 calibration images for statistics and BatchNorm, and is
scored on the first ``--test`` test images (all 10000 by default). Statistics are gathered
twice: at the spec's collection points (post-activation) and at the pre-activation points
of :func:`ccamerge.repair.preactivation_spec`; every configuration below reuses them.

Configurations (``remedy`` column of the JSON):

* ``baseline``: ``cca`` (relative ridge) / ``permute`` / ``average`` on post-activation stats;
* ``ridge``: CCA with gamma over a wide grid (1e6 approximates the orthogonal Procrustes limit);
* ``preact``: alignment computed from pre-activation statistics;
* ``shared_avg``: CCA with the shared space moved to the average of the models' spaces;
* ``streams_permute``: permutations for residual streams, CCA for the groups inside blocks;
* ``repair`` (networks without BatchNorm): REPAIR rescaling of the merged units.

Results: ``benchmarks/results/remedies_{arch}_n{N}.json`` (one row per configuration, with
seconds), and ``remedies_bn_check.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
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

from ccamerge.bn import has_batchnorm  # noqa: E402
from ccamerge.evaluate import ensemble_logits, predict_logits  # noqa: E402
from ccamerge.io import Dataset, load_data  # noqa: E402
from ccamerge.merge import Progress, build_merged, gather_statistics, load_models  # noqa: E402
from ccamerge.methods import AlignContext, make_method  # noqa: E402
from ccamerge.repair import (  # noqa: E402
    average_shared_space,
    preactivation_spec,
    repair_linear,
    repair_targets,
    replace_groups,
    stream_groups,
)

RESULTS = Path(__file__).resolve().parent / "results"
CALIB = 2000
BS = 256


def acc(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(1) == y).float().mean())


def data(arch: str, n_test: int) -> tuple[Dataset, Dataset]:
    paths = fmnist.write_npz(Mdl.view(arch))
    return load_data(paths["calib"]).subset(CALIB), load_data(paths["test"]).subset(n_test)


def configs(has_bn: bool) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [
        {"remedy": "baseline", "method": "average"},
        {"remedy": "baseline", "method": "permute"},
        {"remedy": "baseline", "method": "cca", "gamma": 0.1},
    ]
    for g in (0.01, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 1000.0, 1e6):
        out.append({"remedy": "ridge", "method": "cca", "gamma": g})
    out.append({"remedy": "preact", "method": "permute", "stats": "pre"})
    for g in (0.1, 1.0, 10.0, 1e6):
        out.append({"remedy": "preact", "method": "cca", "gamma": g, "stats": "pre"})
    for g in (0.1, 1.0, 10.0):
        out.append({"remedy": "shared_avg", "method": "cca", "gamma": g, "shared": "average"})
    if has_bn:
        for g in (0.1, 1.0, 10.0):
            out.append({"remedy": "streams_permute", "method": "cca", "gamma": g, "streams": True})
        for g in (1.0, 10.0):
            out.append(
                {
                    "remedy": "streams_permute+preact",
                    "method": "cca",
                    "gamma": g,
                    "streams": True,
                    "stats": "pre",
                }
            )
    else:
        for m, g in (
            ("average", None),
            ("permute", None),
            ("cca", 0.1),
            ("cca", 1.0),
            ("cca", 10.0),
        ):
            c = {"remedy": "repair", "method": m, "repair": True}
            if g is not None:
                c["gamma"] = g
            out.append(c)
        for g in (0.1, 1.0):
            out.append(
                {
                    "remedy": "repair+preact",
                    "method": "cca",
                    "gamma": g,
                    "repair": True,
                    "stats": "pre",
                }
            )
        out.append(
            {
                "remedy": "repair+shared_avg",
                "method": "cca",
                "gamma": 1.0,
                "repair": True,
                "shared": "average",
            }
        )
    return out


def run(arch: str, seeds: list[int], n_test: int) -> dict[str, Any]:
    paths = [str(Mdl.checkpoint(arch, s)) for s in seeds]
    loaded = load_models(paths)
    calib, test = data(arch, n_test)
    N = len(seeds)
    weights = [1.0 / N] * N
    logits = [predict_logits(loaded.build(sd), test, BS, "cpu") for sd in loaded.state_dicts]
    base = [acc(lg, test.y) for lg in logits]
    ens = acc(ensemble_logits(logits), test.y)
    model0 = loaded.build(loaded.state_dicts[0])
    pre_spec, kept = preactivation_spec(loaded.spec, model0)
    t0 = time.perf_counter()
    stats = {"post": gather_statistics(loaded, calib, BS, "cpu", Progress())}
    t_post = time.perf_counter() - t0
    t0 = time.perf_counter()
    stats["pre"] = gather_statistics(
        dataclasses.replace(loaded, spec=pre_spec), calib, BS, "cpu", Progress(), norm_stats=False
    )
    t_pre = time.perf_counter() - t0
    streams = stream_groups(loaded.spec, model0)
    bn = has_batchnorm(model0)
    rows = []
    for cfg in configs(bn):
        t0 = time.perf_counter()
        which = cfg.get("stats", "post")
        params = {"gamma": cfg["gamma"]} if "gamma" in cfg else {}
        method = make_method(cfg["method"], **params)
        ctx = AlignContext(loaded.spec, loaded.state_dicts, 0, stats[which])
        alignment = method.align(ctx)
        if cfg.get("streams"):
            perm = make_method("permute").align(ctx)
            alignment = replace_groups(alignment, perm, streams)
        if cfg.get("shared") == "average":
            alignment = average_shared_space(alignment, weights)
        # "renorm" on a network without BN is the library's REPAIR: only where asked here
        bn_mode = "vector" if cfg["method"] == "permute" or not bn else "renorm"
        _, model, _ = build_merged(
            loaded, alignment, weights, 0, calib, stats["post"], bn_mode, True, BS, "cpu"
        )
        if cfg.get("repair"):
            targets = repair_targets(stats["pre"], alignment, weights)
            repair_linear(model, loaded.spec, targets, list(calib.batches(BS)))
        seconds = time.perf_counter() - t0
        a = acc(predict_logits(model, test, BS, "cpu"), test.y)
        row = {**cfg, "accuracy": a, "seconds": seconds}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {
        "arch": arch,
        "seeds": seeds,
        "N": N,
        "calib": CALIB,
        "test_images": len(test),
        "base": base,
        "ensemble": ens,
        "preact_kept_post": kept,
        "stream_groups": sorted(streams),
        "seconds_statistics": {"post": t_post, "pre": t_pre},
        "machine": {
            "cores": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "loadavg": os.getloadavg(),
        },
        "rows": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="mlp")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--test", type=int, default=10000)
    ap.add_argument("--bn-check", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if args.bn_check:
        out = bn_check(args.test)
        (RESULTS / "remedies_bn_check.json").write_text(json.dumps(out, indent=1))
        return
    out = run(args.arch, args.seeds, args.test)
    (RESULTS / f"remedies_{args.arch}_n{len(args.seeds)}.json").write_text(
        json.dumps(out, indent=1)
    )


def bn_check(n_test: int) -> dict[str, Any]:
    """BatchNorm reset exactness: merge a model with a permuted copy of itself (permute,
    renorm and vector BN) and compare the logits with the original's; then real merges
    (ResNet20 x1 seeds 0, 1) with 0, 1 and 2 eval-mode correction passes."""
    import ccamerge.bn as bnmod
    from ccamerge.apply import permute_state_dict, random_permutations

    out: dict[str, Any] = {"test_images": n_test, "calib": CALIB, "copy": [], "merges": []}
    for arch in ("resnet20x1", "vgg11q"):
        p0 = str(Mdl.checkpoint(arch, 0))
        loaded = load_models([p0])
        calib, test = data(arch, n_test)
        sd = loaded.state_dicts[0]
        perm = permute_state_dict(sd, loaded.spec, random_permutations(loaded.spec, 1))
        pair = dataclasses.replace(loaded, paths=[p0, p0], state_dicts=[sd, perm])
        ref = predict_logits(loaded.build(sd), test, BS, "cpu")
        stats = gather_statistics(pair, calib, BS, "cpu", Progress())
        alignment = make_method("permute").align(
            AlignContext(pair.spec, pair.state_dicts, 0, stats)
        )
        for bn_mode in ("renorm", "vector"):
            for passes in (0, 1, 2):
                bnmod.EVAL_PASSES = passes
                t0 = time.perf_counter()
                _, model, _ = build_merged(
                    pair, alignment, [0.5, 0.5], 0, calib, stats, bn_mode, True, BS, "cpu"
                )
                sec = time.perf_counter() - t0
                lg = predict_logits(model, test, BS, "cpu")
                err = (lg - ref).abs()
                row = {
                    "arch": arch,
                    "bn_mode": bn_mode,
                    "eval_passes": passes,
                    "max_abs_logit_error": float(err.max()),
                    "mean_abs_logit_error": float(err.mean()),
                    "accuracy": acc(lg, test.y),
                    "original_accuracy": acc(ref, test.y),
                    "seconds_merge_and_bn": sec,
                }
                out["copy"].append(row)
                print(json.dumps(row), flush=True)
    arch = "resnet20x1"
    loaded = load_models([str(Mdl.checkpoint(arch, s)) for s in (0, 1)])
    calib, test = data(arch, n_test)
    stats = gather_statistics(loaded, calib, BS, "cpu", Progress())
    ctx = AlignContext(loaded.spec, loaded.state_dicts, 0, stats)
    for name, method, bn_mode in (
        ("permute", make_method("permute"), "vector"),
        ("cca(gamma=0.1)", make_method("cca", gamma=0.1), "renorm"),
        ("cca(gamma=1)", make_method("cca", gamma=1.0), "renorm"),
        ("average", make_method("average"), "renorm"),
    ):
        alignment = method.align(ctx)
        for passes in (0, 1, 2):
            bnmod.EVAL_PASSES = passes
            _, model, _ = build_merged(
                loaded, alignment, [0.5, 0.5], 0, calib, stats, bn_mode, True, BS, "cpu"
            )
            row = {
                "arch": arch,
                "method": name,
                "bn_mode": bn_mode,
                "eval_passes": passes,
                "accuracy": acc(predict_logits(model, test, BS, "cpu"), test.y),
            }
            out["merges"].append(row)
            print(json.dumps(row), flush=True)
    bnmod.EVAL_PASSES = 0
    return out


if __name__ == "__main__":
    main()
