"""Interpolation paths and barriers: the formula, exact endpoints, aligned paths
flatter than the naive one, plot/CSV outputs, and the ``barrier`` command."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ccamerge.cli import app
from ccamerge.io.files import load_data
from ccamerge.methods import AlignContext, list_methods, make_method
from ccamerge.pipeline import (
    BatchNormSettings,
    Calibration,
    MergeRecipe,
    Progress,
    evaluate,
    gather_statistics,
    load_models,
    predict_logits,
)
from ccamerge.runs.barrier import (
    BarrierPlan,
    barrier,
    grid,
    make_methods,
    path_model,
    path_sides,
    plot_barrier,
    run_barrier,
    write_csv,
)
from ccamerge.runtime.errors import OptionError

METHODS = ["average", "permute", "cca"]
STEPS = 7
runner = CliRunner()


def needs(method: str):
    """Skip only when ``method`` is not registered (permute is added in parallel)."""
    return pytest.mark.skipif(method not in list_methods(), reason=f"{method} not registered")


def available(methods):
    return [m for m in methods if m in list_methods()]


@pytest.fixture(scope="module")
def report(digits_mlps):
    plan = BarrierPlan.from_options(
        digits_mlps.paths[:2],
        eval_data=str(digits_mlps.test_path),
        data=str(digits_mlps.calib_path),
        methods=available(METHODS),
        steps=STEPS,
    )
    return run_barrier(plan)


@pytest.fixture(scope="module")
def loaded_and_stats(digits_mlps):
    loaded = load_models([str(p) for p in digits_mlps.paths[:2]])
    calib = Calibration(load_data(digits_mlps.calib_path))
    return loaded, calib, gather_statistics(loaded, calib, Progress())


def recipe(mode: str = "renorm", reset: bool = True) -> MergeRecipe:
    """The path's recipe before alignment (weights and reference are set per point)."""
    return MergeRecipe([0.5, 0.5], 0, BatchNormSettings(mode, reset))


def test_grid_is_evenly_spaced_with_exact_ends():
    assert grid(5) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert grid(2) == [0.0, 1.0]
    assert 0.5 in grid(11) and 0.5 not in grid(6)
    with pytest.raises(OptionError):
        grid(1)


def test_barrier_formula_on_hand_values():
    ts = [0.0, 0.25, 0.5, 0.75, 1.0]
    loss = [1.0, 2.0, 3.0, 2.5, 2.0]  # chord: 1, 1.25, 1.5, 1.75, 2
    gap, at = barrier(ts, loss, higher_is_better=False)
    assert gap == pytest.approx(1.5) and at == 0.5
    acc = [0.9, 0.85, 0.5, 0.6, 0.7]  # chord: 0.9, 0.85, 0.8, 0.75, 0.7
    gap, at = barrier(ts, acc, higher_is_better=True)
    assert gap == pytest.approx(0.3) and at == 0.5
    # a curve that beats the straight line everywhere has barrier 0 (the ends)
    gap, _ = barrier(ts, [1.0, 0.5, 0.4, 0.6, 1.0], higher_is_better=False)
    assert gap == 0.0


@pytest.mark.parametrize("method", ["permute", "cca"])
def test_aligned_paths_have_smaller_barriers_than_averaging(report, method):
    if method not in list_methods():
        pytest.skip(f"{method} not registered")
    b = report["barriers"]
    # measured (seeds 0 and 1, 7 steps): loss barrier average 0.656, permute 0.047,
    # cca 0.010; accuracy barrier average 4.1 points, permute 1.7, cca 0.3.
    assert b["average"]["loss"] - b[method]["loss"] > 0.4
    assert b["average"]["loss"] > 5 * b[method]["loss"]
    assert b["average"]["accuracy"] - b[method]["accuracy"] > 0.01
    assert b[method]["loss_mid"] < b["average"]["loss_mid"]
    assert b[method]["accuracy_mid"] > b["average"]["accuracy_mid"]


def test_endpoints_reproduce_the_checkpoints_exactly(report, digits_mlps):
    test = load_data(digits_mlps.test_path)
    truth = [evaluate(m, test) for m in digits_mlps.models[:2]]
    for end, score in zip(report["endpoints"], truth):
        assert (end["accuracy"], end["loss"]) == (score.accuracy, score.loss)
    assert set(report["curves"]) == set(available(METHODS))
    for points in report["curves"].values():
        assert [p["t"] for p in points] == grid(STEPS)
        for p, score in ((points[0], truth[0]), (points[-1], truth[1])):
            assert (p["accuracy"], p["loss"]) == (score.accuracy, score.loss)


@pytest.mark.parametrize("method", available(METHODS))
def test_path_formula_gives_the_endpoints_without_batchnorm(loaded_and_stats, digits_mlps, method):
    """The merge at weight 1 is the side's reference model (or a permutation of B)."""
    loaded, calib, stats = loaded_and_stats
    sides = path_sides(make_method(method), loaded, stats, recipe())
    x = load_data(digits_mlps.test_path)
    for t, original in ((0.0, digits_mlps.models[0]), (1.0, digits_mlps.models[1])):
        model, _ = path_model(loaded, sides, t, calib, stats)
        got, want = predict_logits(model, x), predict_logits(original, x)
        if getattr(make_method(method), "permutation_only", False) and t == 1.0:
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        else:
            assert torch.equal(got, want)


def test_dense_methods_align_each_half_to_its_nearer_model(loaded_and_stats, digits_mlps):
    loaded, _, stats = loaded_and_stats
    first, second = path_sides(make_method("cca"), loaded, stats, recipe())
    assert (first.reference, second.reference) == (0, 1)
    g = loaded.spec.groups[0].name
    eye = torch.eye(loaded.spec.groups[0].size, dtype=torch.float64)
    assert torch.equal(first.alignment.groups[g].M[0], eye)
    assert torch.equal(second.alignment.groups[g].M[1], eye)
    # statistics gathered once serve both references: the same as gathering with B first
    swapped = load_models([str(p) for p in digits_mlps.paths[1::-1]])
    stats_ba = gather_statistics(
        swapped, Calibration(load_data(digits_mlps.calib_path)), Progress()
    )
    direct = make_method("cca").align(AlignContext(swapped.spec, swapped.state_dicts, 0, stats_ba))
    torch.testing.assert_close(second.alignment.groups[g].M[0], direct.groups[g].M[1])


@needs("permute")
def test_permutation_methods_need_one_alignment(loaded_and_stats):
    loaded, _, stats = loaded_and_stats
    first, second = path_sides(make_method("permute"), loaded, stats, recipe())
    assert first is second and first.reference == 0


def test_method_parameters_go_to_the_methods_that_take_them():
    avg, cca = make_methods(["average", "cca"], {"gamma": 0.5})
    assert avg.params() == {} and cca.gamma == 0.5
    with pytest.raises(OptionError, match="gamma"):
        make_methods(["average"], {"gamma": 0.5})
    with pytest.raises(OptionError, match="twice"):
        make_methods(["cca", "cca"], {})
    with pytest.raises(OptionError, match="unknown method"):
        make_methods(["nope"], {})


def test_batchnorm_endpoints_are_the_checkpoints(tmp_path):
    """With BatchNorm, re-merging at t = 0 recomputes running statistics and changes
    the function; the curve's endpoints are the checkpoints themselves."""
    from ccamerge.models.archs.vgg import vgg_config
    from ccamerge.models.registry import get_architecture

    arch = get_architecture("vgg")
    cfg = vgg_config(convs_per_stage=(1, 1), widths=(4, 8), num_classes=3, in_channels=1)
    shape = arch.input_shape(cfg)
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = arch.build(cfg).train()
        with torch.no_grad():  # running statistics of shifted data, unlike the test data's
            model(torch.randn(64, *shape) * 2 + 1)
        paths.append(tmp_path / f"vgg{seed}.pt")
        torch.save(model.state_dict(), paths[-1])
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, *shape, generator=gen), torch.randint(0, 3, (96,), generator=gen)
    data = tmp_path / "data.npz"
    np.savez(data, x=x.numpy(), y=y.numpy())

    rep = run_barrier(
        BarrierPlan.from_options(
            paths, eval_data=str(data), data=str(data), methods=["cca"], steps=3
        )
    )
    loaded = load_models([str(p) for p in paths])
    ds = load_data(data)
    originals = [evaluate(loaded.build(sd), ds) for sd in loaded.state_dicts]
    ends = rep["curves"]["cca"][0], rep["curves"]["cca"][-1]
    for p, s in zip(ends, originals):
        assert (p["loss"], p["accuracy"]) == (s.loss, s.accuracy)
    assert "reset" in rep["batchnorm"]["cca"]

    calib = Calibration(ds)
    stats = gather_statistics(loaded, calib, Progress())

    def at_zero(mode: str, reset: bool) -> torch.nn.Module:
        sides = path_sides(make_method("cca"), loaded, stats, recipe(mode, reset))
        return path_model(loaded, sides, 0.0, calib, stats)[0]

    want = predict_logits(loaded.build(loaded.state_dicts[0]), ds)
    kept = at_zero("renorm", False)
    assert torch.equal(predict_logits(kept, ds), want)
    # recomputed statistics: a different function (renormalisation keeps it close)
    reset = at_zero("vector", True)
    assert not torch.allclose(predict_logits(reset, ds), want, atol=1e-2)
    renorm = at_zero("renorm", True)
    assert not torch.equal(predict_logits(renorm, ds), want)


def test_plot_has_two_panels_with_one_line_per_method(report, tmp_path):
    path = tmp_path / "barrier.png"
    fig = plot_barrier(report, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(fig.axes) == 2
    names = list(report["curves"])
    for ax in fig.axes:
        assert len(ax.lines) == len(names)
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert [label.split()[0] for label in labels] == names
        assert ax.get_xlabel() and ax.get_ylabel()
    assert "mlp0.pt" in fig.get_suptitle() and "mlp1.pt" in fig.get_suptitle()


def test_csv_has_one_row_per_method_and_t(report, tmp_path):
    path = tmp_path / "curve.csv"
    write_csv(report, path)
    rows = list(csv.reader(path.open()))
    assert rows[0] == ["method", "t", "loss", "accuracy"]
    assert len(rows) == 1 + STEPS * len(report["curves"])
    first = report["curves"]["average"][0]
    assert rows[1] == ["average", "0.0", repr(first["loss"]), repr(first["accuracy"])]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_barrier_command_json_plot_and_csv(digits_mlps, tmp_path):
    png, out_csv = tmp_path / "b.png", tmp_path / "c.csv"
    res = run(
        "barrier", *digits_mlps.paths[:2], "--data", digits_mlps.calib_path,
        "--eval-data", digits_mlps.test_path, "--methods", "average,cca", "--steps", 5,
        "--gamma", 0.1, "--plot", png, "--csv", out_csv, "--json",
    )  # fmt: skip
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert set(doc["curves"]) == {"average", "cca"} == set(doc["barriers"])
    assert [p["t"] for p in doc["curves"]["cca"]] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert {"t", "loss", "accuracy"} == set(doc["curves"]["cca"][0])
    assert {"loss", "accuracy", "loss_mid", "accuracy_mid"} <= set(doc["barriers"]["cca"])
    assert [e["t"] for e in doc["endpoints"]] == [0.0, 1.0]
    assert doc["methods"]["cca"]["gamma"] == 0.1
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert len(out_csv.read_text().splitlines()) == 1 + 5 * 2
    assert "Barriers" in res.stderr


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--steps", "1"], "--steps"),
        (["--methods", "average,nope"], "unknown method"),
        (["--methods", "average", "--gamma", "1"], "gamma"),
        (["--plot", "out.txt"], "--plot"),
    ],
)
def test_barrier_command_errors_are_one_line(digits_mlps, tmp_path, extra, message):
    extra = [str(tmp_path / e) if e == "out.txt" else e for e in extra]
    res = run(
        "barrier", *digits_mlps.paths[:2], "--data", digits_mlps.calib_path,
        "--eval-data", digits_mlps.test_path, *extra,
    )  # fmt: skip
    assert res.exit_code == 1
    assert res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0]


def test_barrier_needs_labels_and_calibration_for_cca(digits_mlps, tmp_path):
    unlabelled = tmp_path / "x.npz"
    np.savez(unlabelled, x=load_data(digits_mlps.test_path).x.numpy())
    res = run("barrier", *digits_mlps.paths[:2], "--data", digits_mlps.calib_path,
              "--eval-data", unlabelled)  # fmt: skip
    assert res.exit_code == 1 and "no labels" in res.stderr
    res = run("barrier", *digits_mlps.paths[:2], "--eval-data", digits_mlps.test_path,
              "--methods", "cca")  # fmt: skip
    assert res.exit_code == 1 and "--data" in res.stderr


def test_barrier_help():
    res = run("barrier", "--help")
    assert res.exit_code == 0 and "--steps" in res.stdout and "--plot" in res.stdout


def test_barrier_gamma_takes_the_merge_type_and_refuses_auto(digits_mlps):
    """--gamma is one option type everywhere (a number or 'auto'); barrier says 'auto'
    is not for it in one line, and a word that is neither is refused like in merge."""
    common = ["barrier", *digits_mlps.paths[:2], "--data", digits_mlps.calib_path,
              "--eval-data", digits_mlps.test_path, "--methods", "cca"]  # fmt: skip
    auto = run(*common, "--gamma", "auto")
    assert auto.exit_code == 1 and "not 'auto'" in auto.stderr
    assert len(auto.stderr.strip().splitlines()) == 1
    word = run(*common, "--gamma", "big")
    assert word.exit_code == 1 and "--gamma expects a finite number or 'auto'" in word.stderr
