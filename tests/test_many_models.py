"""Merging N > 2 models: reference choice, weights, pairwise statistics, saved transforms."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from ccamerge.cli import app
from ccamerge.maths.stats import PairwiseCovariance, collect_statistics, statistics_bytes
from ccamerge.methods import list_methods, method_class
from ccamerge.models.archs.mlp import MLP
from ccamerge.models.registry import get_architecture
from ccamerge.pipeline import LoadedModels, evaluate, load_models, load_transforms
from ccamerge.runs.merge import merge
from ccamerge.runtime.errors import OptionError

runner = CliRunner()


def test_cca_beats_permute_and_average_with_four_models(digits_mlps):
    # Measured on the 2-core CPU (test accuracy, 4 seeds, 1300 calibration samples, REPAIR
    # for the dense methods): bases 97.8-98.2%, ensemble 98.6%; cca 97.0, weight-matching 94.4,
    # permute 93.8, zipit 90.7 (alpha 0.5, beta 0), average 83.9.
    # the paper's merges (refit=False): with the refit even the average comes close
    kw = dict(data=str(digits_mlps.calib_path), eval_data=str(digits_mlps.test_path), refit=False)
    acc = {
        m: merge(digits_mlps.paths, method=m, **kw).report["evaluation"]["merged"]["accuracy"]
        for m in ("cca", "permute", "average")
    }
    assert acc["cca"] > acc["permute"] + 0.025
    assert acc["cca"] > acc["average"] + 0.1
    assert acc["cca"] > 0.95


def test_reference_best_picks_the_most_accurate_model(digits_mlps):
    accs = [evaluate(m, digits_mlps.test).accuracy for m in digits_mlps.models]
    losses = [evaluate(m, digits_mlps.train).loss for m in digits_mlps.models]
    rep = merge(
        digits_mlps.paths,
        method="permute",
        reference="best",
        data=str(digits_mlps.calib_path),
        eval_data=str(digits_mlps.test_path),
    ).report
    best = max(range(4), key=lambda k: (accs[k], -k))
    assert rep["reference"] == best
    assert rep["reference_choice"]["rule"] == "best"
    assert [s["accuracy"] for s in rep["reference_choice"]["scores"]] == pytest.approx(accs)
    assert rep["groups"][0]["per_model"][best] is None  # the reference has no quality
    # without evaluation data: the lowest cross-entropy on the calibration labels
    rep = merge(
        digits_mlps.paths, method="permute", reference="best", data=str(digits_mlps.calib_path)
    ).report
    assert rep["reference"] == int(np.argmin(losses))
    assert rep["reference_choice"]["by"].startswith("cross-entropy")


def test_reference_best_needs_labels(digits_mlps, tmp_path):
    unlabelled = tmp_path / "x.npz"
    np.savez(unlabelled, x=digits_mlps.train.x[:300].numpy())
    with pytest.raises(OptionError, match="labelled"):
        merge(digits_mlps.paths[:2], method="permute", reference="best", data=str(unlabelled))


@pytest.mark.parametrize("reference", [0, 1])
def test_full_weight_on_the_reference_gives_it_back_exactly(digits_mlps, reference):
    weights = [1.0, 0.0, 0.0]
    weights[0], weights[reference] = weights[reference], weights[0]
    res = merge(
        digits_mlps.paths[:3],
        method="permute",
        reference=reference,
        weights=weights,
        data=str(digits_mlps.calib_path),
        refit=False,  # the refit's least squares give it back to round-off, not bit for bit
    )
    for name, t in digits_mlps.models[reference].state_dict().items():
        assert torch.equal(res.state_dict[name], t), name


def test_weights_are_normalised_and_reported(digits_mlps):
    rep = merge(digits_mlps.paths[:3], method="average", weights=[5, 3, 2]).report
    assert rep["weights"] == pytest.approx([0.5, 0.3, 0.2])


def _loaded(digits_mlps, n: int) -> LoadedModels:
    return load_models([str(p) for p in digits_mlps.paths[:n]])


@pytest.mark.parametrize("reference", [0, 2])
def test_pairwise_blocks_equal_the_joint_ones(digits_mlps, reference):
    loaded = _loaded(digits_mlps, 4)
    models = [loaded.build(sd) for sd in loaded.state_dicts]
    batches = list(digits_mlps.train.batches(200))
    joint = collect_statistics(models, loaded.spec, batches)
    pair = collect_statistics(models, loaded.spec, batches, pairwise=True, reference=reference)
    for g in loaded.spec.groups:
        J, P = joint.groups[g.name], pair.groups[g.name]
        assert isinstance(P, PairwiseCovariance)
        assert P.n == J.n
        blocks = [(k, k) for k in range(4)] + [(reference, k) for k in range(4)]
        blocks += [(k, reference) for k in range(4)]
        for i, j in blocks:
            assert torch.allclose(P.block(i, j), J.block(i, j), rtol=1e-10, atol=1e-12), (i, j)
        other = next(k for k in range(4) if k != reference)
        with pytest.raises(OptionError, match="no block"):
            P.block(other, next(k for k in range(4) if k not in (reference, other)))
        # the memory formula is what the accumulators hold
    for mode, stats in (("joint", joint), ("pairwise", pair)):
        held = sum(s.nbytes for s in stats.groups.values())
        assert held == statistics_bytes(loaded.spec, 4, mode, norm_stats=False)


def test_memory_limit_switches_to_pairwise_statistics(digits_mlps):
    kw = dict(data=str(digits_mlps.calib_path), method="cca")
    joint = merge(digits_mlps.paths, **kw)
    pair = merge(digits_mlps.paths, memory_limit=10_000, **kw)
    assert any("pairwise" in w for w in pair.report["warnings"])
    assert not any("pairwise" in w for w in joint.report["warnings"])
    for name, t in joint.state_dict.items():
        assert torch.allclose(pair.state_dict[name], t, atol=1e-5), name
    with pytest.raises(OptionError, match="joint covariance of all 4 models"):
        merge(digits_mlps.paths, memory_limit=10_000, **{**kw, "method": "zipit"})


def test_resnet50_statistics_memory_numbers():
    """The numbers quoted in docs/methods.md."""
    from ccamerge.models.archs.resnet_tv import tv_resnet_config

    spec = get_architecture("resnet").spec(tv_resnet_config(50))
    gib = 2.0**30
    assert statistics_bytes(spec, 10, "joint", norm_stats=False) / gib == pytest.approx(
        6.03, abs=0.005
    )
    assert statistics_bytes(spec, 10, "pairwise", norm_stats=False) / gib == pytest.approx(
        1.21, abs=0.005
    )
    assert statistics_bytes(spec, 10, "joint") / gib == pytest.approx(8.13, abs=0.005)


# ---------------------------------------------------------------------------
# saved transforms and `ccamerge apply`


@pytest.mark.parametrize("method", list_methods())
def test_apply_reproduces_the_merge_bit_for_bit(digits_mlps, tmp_path, method):
    paths = [str(p) for p in digits_mlps.paths[:3]]
    merged, tr, again = (
        tmp_path / "m.safetensors",
        tmp_path / "t.safetensors",
        tmp_path / "a.safetensors",
    )
    r = runner.invoke(
        app,
        [
            "merge",
            *paths,
            "-d",
            str(digits_mlps.calib_path),
            "-m",
            method,
            "--weights",
            "0.5,0.3,0.2",
            "--reference",
            "1",
            "-o",
            str(merged),
            "--save-transforms",
            str(tr),
            "-q",
        ],
    )
    assert r.exit_code == 0, r.output
    # the same calibration data: dense methods renormalise (REPAIR) after the merge
    calib = ["-d", str(digits_mlps.calib_path)]
    r = runner.invoke(
        app, ["apply", "--transforms", str(tr), *paths, *calib, "-o", str(again), "-q"]
    )
    assert r.exit_code == 0, r.output
    a, b = load_file(str(merged)), load_file(str(again))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    r = runner.invoke(app, ["apply", "-t", str(tr), *paths, "--json", "-q"])
    warnings = json.loads(r.stdout)["warnings"]
    # without data: the dense methods' renormalisation (REPAIR) is skipped, with a warning
    assert any("REPAIR" in w for w in warnings) == (not method_class(method).permutation_only)
    saved = load_transforms(tr)
    assert saved.metadata["method"] == method and saved.reference == 1
    assert saved.metadata["weights"] == pytest.approx([0.5, 0.3, 0.2])
    assert set(saved.alignment.groups) == {"hidden0", "hidden1"}
    # other weights: a different merge from the same transforms
    r = runner.invoke(app, ["apply", "-t", str(tr), *paths, "--weights", "1,0,0", "--json", "-q"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["weights"] == [1.0, 0.0, 0.0]


def _tiny_vgg_checkpoints(tmp_path, n: int):
    from ccamerge.models.archs.vgg import vgg_config

    arch = get_architecture("vgg")
    config = vgg_config((1, 1), (4, 8), batch_norm=True)
    paths = []
    for seed in range(n):
        torch.manual_seed(seed)
        model = arch.build(config)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
        path = tmp_path / f"vgg{seed}.pt"
        torch.save(model.state_dict(), path)
        paths.append(str(path))
    data = tmp_path / "calib.npz"
    np.savez(data, x=np.random.default_rng(0).normal(size=(200, 3, 4, 4)).astype(np.float32))
    return paths, str(data)


@pytest.mark.parametrize("method", ["cca", "permute"])
def test_apply_reproduces_a_batchnorm_merge_bit_for_bit(tmp_path, method):
    paths, data = _tiny_vgg_checkpoints(tmp_path, 3)
    merged, tr, again = (
        tmp_path / "m.safetensors",
        tmp_path / "t.safetensors",
        tmp_path / "a.safetensors",
    )
    res = merge(
        paths, method=method, data=data, output=str(merged), save_transforms=str(tr), batch_size=32
    )
    assert res.report["bn_mode"] == ("renorm" if method == "cca" else "vector")
    r = runner.invoke(
        app,
        ["apply", "-t", str(tr), *paths, "-d", data, "-o", str(again), "-q"],
    )
    assert r.exit_code == 0, r.output
    a, b = load_file(str(merged)), load_file(str(again))
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_apply_refuses_transforms_that_do_not_fit(digits_mlps, tmp_path):
    paths = [str(p) for p in digits_mlps.paths[:2]]
    tr = tmp_path / "t.safetensors"
    merge(paths, method="permute", data=str(digits_mlps.calib_path), save_transforms=str(tr))
    vgg_paths, _ = _tiny_vgg_checkpoints(tmp_path, 2)
    cases = [
        ([str(tr), *paths, str(digits_mlps.paths[2])], "hold 2 models, but 3 checkpoints"),
        ([str(tr), *vgg_paths], "computed for a mlp"),
        ([str(digits_mlps.paths[0]), *paths], "not a valid safetensors|not written by"),
    ]
    narrow = []
    for seed in range(2):
        torch.manual_seed(seed)
        narrow.append(tmp_path / f"narrow{seed}.pt")
        torch.save(MLP([64, 32, 64, 10]).state_dict(), narrow[-1])
    cases.append(([str(tr), *map(str, narrow)], "with config"))
    for args, message in cases:
        r = runner.invoke(app, ["apply", "-t", args[0], *args[1:]])
        assert r.exit_code == 1, (args, r.output)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
        assert any(m in lines[0] for m in message.split("|")), lines[0]


# ---------------------------------------------------------------------------
# CLI


def test_apply_help():
    r = runner.invoke(app, ["apply", "--help"])
    assert r.exit_code == 0
    for option in ("--transforms", "--weights", "--output", "--data"):
        assert option in r.stdout


@pytest.mark.parametrize("method", list_methods())
def test_merge_cli_runs_every_method(digits_mlps, method):
    paths = [str(p) for p in digits_mlps.paths[:3]]
    r = runner.invoke(
        app, ["merge", *paths, "-d", str(digits_mlps.calib_path), "-m", method, "--json"]
    )
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["method"] == method
    assert len(rep["groups"][0]["per_model"]) == 3


@pytest.mark.parametrize(
    "value, message",
    [
        ("bogus", "--reference must be first, best or a model index"),
        ("3", "out of range"),
        ("-1", "out of range"),
    ],
)
def test_bad_reference_values_give_one_line_errors(digits_mlps, value, message):
    paths = [str(p) for p in digits_mlps.paths[:3]]
    r = runner.invoke(app, ["merge", *paths, "-m", "average", "--reference", value])
    assert r.exit_code == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert r.stdout == ""
