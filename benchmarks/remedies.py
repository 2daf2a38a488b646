"""Remedies for CCA on narrow networks (issue 9), measured on the cached Fashion-MNIST models.

    python benchmarks/remedies.py --arch mlp --seeds 0 1
    python benchmarks/remedies.py --arch mlp --seeds 0 1 2 3
    python benchmarks/remedies.py --arch resnet20x1 --seeds 0 1 --test 2000
    python benchmarks/remedies.py --bn-check            # BN reset: train-mode vs eval-mode fix
    python benchmarks/remedies.py --arch mlp --diagnose  # model 1 alone through its transforms

Every merge uses the first 2000 calibration images for statistics and BatchNorm, and is
scored on the first ``--test`` test images (all 10000 by default). Statistics are gathered
twice: at the spec's collection points (post-activation) and at the pre-activation points
of :func:`ccamerge.maths.repair.preactivation_spec`; every configuration below reuses them.

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
from common import top1 as acc  # noqa: E402

from ccamerge.io.files import Dataset, load_data  # noqa: E402
from ccamerge.maths.bn import has_batchnorm  # noqa: E402
from ccamerge.maths.repair import (  # noqa: E402
    average_shared_space,
    preactivation_spec,
    repair_linear,
    repair_targets,
    replace_groups,
    stream_groups,
)
from ccamerge.methods import AlignContext, make_method  # noqa: E402
from ccamerge.pipeline import (  # noqa: E402
    BatchNormSettings,
    Calibration,
    MergeRecipe,
    Progress,
    build_merged,
    ensemble_logits,
    gather_statistics,
    load_models,
    predict_logits,
)

RESULTS = Path(__file__).resolve().parent / "results"
CALIB = 2000
BS = 256


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
    stats = {"post": gather_statistics(loaded, Calibration(calib, BS, "cpu"), Progress())}
    t_post = time.perf_counter() - t0
    t0 = time.perf_counter()
    stats["pre"] = gather_statistics(
        dataclasses.replace(loaded, spec=pre_spec),
        Calibration(calib, BS, "cpu"),
        Progress(),
        norm_stats=False,
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
            loaded,
            MergeRecipe(weights, 0, BatchNormSettings(bn_mode, True), "cpu", alignment),
            Calibration(calib, BS, "cpu"),
            stats["post"],
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


def table() -> str:
    """Markdown table of the ``remedies_{arch}_n{N}.json`` files: one row per configuration,
    one column per file (accuracy in %)."""
    files = sorted(RESULTS.glob("remedies_*_n*.json"))
    data = [json.loads(f.read_text()) for f in files]

    def key(r: dict) -> str:
        parts = [r["remedy"], r["method"]]
        if "gamma" in r:
            parts.append(f"γ={r['gamma']:g}")
        return " ".join(parts)

    order: list[str] = []
    for d in data:
        for r in d["rows"]:
            if key(r) not in order:
                order.append(key(r))
    cols = [f"{d['arch']} N={d['N']} ({d['test_images']} test)" for d in data]
    lines = ["| configuration | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines.append("| ensemble | " + " | ".join(f"{100 * d['ensemble']:.1f}" for d in data) + " |")
    for k in order:
        cells = []
        for d in data:
            hit = [r for r in d["rows"] if key(r) == k]
            cells.append(f"{100 * hit[0]['accuracy']:.1f}" if hit else "")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="mlp")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--test", type=int, default=10000)
    ap.add_argument("--bn-check", action="store_true")
    ap.add_argument("--diagnose", action="store_true", help="model 1 alone, aligned to model 0")
    ap.add_argument("--table", action="store_true", help="print the markdown table and exit")
    args = ap.parse_args()
    if args.table:
        print(table())
        return
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if args.diagnose:
        out = diagnose(args.arch, args.test)
        (RESULTS / f"remedies_{args.arch}_alone.json").write_text(json.dumps(out, indent=1))
        return
    if args.bn_check:
        out = bn_check(args.test)
        (RESULTS / "remedies_bn_check.json").write_text(json.dumps(out, indent=1))
        return
    out = run(args.arch, args.seeds, args.test)
    (RESULTS / f"remedies_{args.arch}_n{len(args.seeds)}.json").write_text(
        json.dumps(out, indent=1)
    )


def diagnose(arch: str, n_test: int) -> dict[str, Any]:
    """Why dense alignment hurts: model 1 mapped alone into model 0's space (merge weights
    (0, 1)), per method and ridge. A permutation keeps its function exactly; a dense map
    does not, because the ReLUs between the maps do not commute with them."""
    loaded = load_models([str(Mdl.checkpoint(arch, s)) for s in (0, 1)])
    calib, test = data(arch, n_test)
    stats = gather_statistics(loaded, Calibration(calib, BS, "cpu"), Progress())
    ctx = AlignContext(loaded.spec, loaded.state_dicts, 0, stats)
    model1 = acc(predict_logits(loaded.build(loaded.state_dicts[1]), test, BS, "cpu"), test.y)
    rows = []
    methods = [("permute", {})] + [("cca", {"gamma": g}) for g in (0.1, 1.0, 3.0, 10.0, 1e6)]
    for name, params in methods:
        alignment = make_method(name, **params).align(ctx)
        for bn_mode in ("vector", "renorm"):
            _, model, note = build_merged(
                loaded,
                MergeRecipe([0.0, 1.0], 0, BatchNormSettings(bn_mode, True), "cpu", alignment),
                Calibration(calib, BS, "cpu"),
                stats,
            )
            a = acc(predict_logits(model, test, BS, "cpu"), test.y)
            row = {"method": name, **params, "bn_mode": bn_mode, "note": note, "accuracy": a}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return {"arch": arch, "test_images": len(test), "model1_accuracy": model1, "rows": rows}


@torch.no_grad()
def correct_running_stats(model: torch.nn.Module, batches: list, passes: int) -> None:
    """Eval-mode correction of a train-mode BN reset (measured, not kept in the library):
    each pass sets every BatchNorm's running mean and (biased) variance to the whole-set
    statistics of its input in eval mode, all BatchNorms at once from one forward pass.
    Exact only after as many passes as the network has BatchNorms in depth."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    model.eval()
    for _ in range(passes):
        acc: dict = {m: [0, 0.0, 0.0] for m in bns}

        def hook(m, args, acc=acc):
            x = args[0].detach().transpose(0, 1).reshape(args[0].shape[1], -1).double()
            a = acc[m]
            a[0] += x.shape[1]
            a[1] = a[1] + x.sum(1)
            a[2] = a[2] + (x * x).sum(1)

        handles = [m.register_forward_pre_hook(hook) for m in bns]
        try:
            for x in batches:
                model(x)
        finally:
            for h in handles:
                h.remove()
        for m, (n, s1, s2) in acc.items():
            mean = s1 / n
            m.running_mean.copy_(mean.to(m.running_mean))
            m.running_var.copy_((s2 / n - mean * mean).clamp_min(0).to(m.running_var))


def _with_eval_passes(passes: int) -> None:
    """Make the library's BN reset (as build_merged calls it) add ``passes`` corrections."""
    import ccamerge.maths.bn as bnmod
    import ccamerge.pipeline.assemble as assemble

    original = getattr(bnmod, "_original_reset", bnmod.reset_batchnorm)
    bnmod._original_reset = original

    def reset(model, batches, device="cpu"):
        batches = list(batches)
        seen = original(model, batches, device)
        correct_running_stats(model, [x.to(device) for x in batches], passes)
        return seen

    bnmod.reset_batchnorm = assemble.reset_batchnorm = reset if passes else original


def bn_check(n_test: int) -> dict[str, Any]:
    """BatchNorm reset exactness: merge a model with a permuted copy of itself (permute,
    renorm and vector BN) and compare the logits with the original's; then real merges
    (ResNet20 x1 seeds 0, 1) with 0, 1 and 2 eval-mode correction passes."""
    from ccamerge.maths.algebra import permute_state_dict, random_permutations

    out: dict[str, Any] = {"test_images": n_test, "calib": CALIB, "copy": [], "merges": []}
    for arch in ("resnet20x1", "vgg11q"):
        p0 = str(Mdl.checkpoint(arch, 0))
        loaded = load_models([p0])
        calib, test = data(arch, n_test)
        sd = loaded.state_dicts[0]
        perm = permute_state_dict(sd, loaded.spec, random_permutations(loaded.spec, 1))
        pair = dataclasses.replace(loaded, paths=[p0, p0], state_dicts=[sd, perm])
        ref = predict_logits(loaded.build(sd), test, BS, "cpu")
        stats = gather_statistics(pair, Calibration(calib, BS, "cpu"), Progress())
        alignment = make_method("permute").align(
            AlignContext(pair.spec, pair.state_dicts, 0, stats)
        )
        for bn_mode in ("renorm", "vector"):
            for passes in (0, 1, 2):
                _with_eval_passes(passes)
                t0 = time.perf_counter()
                _, model, _ = build_merged(
                    pair,
                    MergeRecipe([0.5, 0.5], 0, BatchNormSettings(bn_mode, True), "cpu", alignment),
                    Calibration(calib, BS, "cpu"),
                    stats,
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
    stats = gather_statistics(loaded, Calibration(calib, BS, "cpu"), Progress())
    ctx = AlignContext(loaded.spec, loaded.state_dicts, 0, stats)
    for name, method, bn_mode in (
        ("permute", make_method("permute"), "vector"),
        ("cca(gamma=0.1)", make_method("cca", gamma=0.1), "renorm"),
        ("cca(gamma=1)", make_method("cca", gamma=1.0), "renorm"),
        ("average", make_method("average"), "renorm"),
    ):
        alignment = method.align(ctx)
        for passes in (0, 1, 2):
            _with_eval_passes(passes)
            _, model, _ = build_merged(
                loaded,
                MergeRecipe([0.5, 0.5], 0, BatchNormSettings(bn_mode, True), "cpu", alignment),
                Calibration(calib, BS, "cpu"),
                stats,
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
    _with_eval_passes(0)
    return out


if __name__ == "__main__":
    main()
