"""The command line: help, JSON on stdout, one-line errors, a loadable output."""

from __future__ import annotations

import json
import shlex

import pytest
import torch
from typer.testing import CliRunner

import ccamerge
from ccamerge.cli import app
from ccamerge.io.files import load_data, read_metadata, sha256
from ccamerge.models.registry import detect_architecture
from ccamerge.pipeline import GAMMA_GRID, evaluate

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_help_of_every_command():
    res = run("--help")
    assert res.exit_code == 0
    names = [c.name for c in app.registered_commands]
    assert {"merge", "archs", "demo"} <= set(names)
    for name in names:
        r = run(name, "--help")
        assert r.exit_code == 0, name
        assert "Usage" in r.stdout


def test_merge_json_and_output_file(digits_mlps, tmp_path):
    out = tmp_path / "merged.safetensors"
    res = run(
        "merge",
        *digits_mlps.paths[:2],
        "--data",
        digits_mlps.calib_path,
        "--eval-data",
        digits_mlps.test_path,
        "-o",
        out,
        "--json",
        "--gamma",
        "0.1",
    )
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)  # stdout is exactly one JSON document
    for key in (
        "architecture",
        "method",
        "output",
        "num_samples",
        "groups",
        "timings",
        "evaluation",
    ):
        assert key in doc
    assert doc["method"] == "cca"
    assert doc["num_samples"] + doc["check"]["num_samples"] == len(digits_mlps.train)
    assert {"name", "size", "mean_correlation", "min_correlation"} <= set(doc["groups"][0])
    assert {"models", "ensemble", "merged"} <= set(doc["evaluation"])
    # the file loads into the architecture and reproduces the merged accuracy
    from safetensors.torch import load_file

    sd = load_file(out)
    ref = torch.load(digits_mlps.paths[0], weights_only=True)
    assert {k: (v.shape, v.dtype) for k, v in sd.items()} == {
        k: (v.shape, v.dtype) for k, v in ref.items()
    }
    model = detect_architecture(sd).build()
    model.load_state_dict(sd)
    acc = evaluate(model, load_data(digits_mlps.test_path)).accuracy
    assert acc == pytest.approx(doc["evaluation"]["merged"]["accuracy"], abs=1e-9)
    meta = read_metadata(out)
    assert meta["method"] == "cca" and json.loads(meta["params"])["gamma"] == 0.1
    inputs = json.loads(meta["inputs"])
    assert [i["sha256"] for i in inputs] == [sha256(p) for p in digits_mlps.paths[:2]]
    assert json.loads(meta["architecture"])["name"] == "mlp"
    assert int(meta["num_samples"]) == doc["num_samples"]
    assert meta["ccamerge_version"]


def test_cli_chooses_the_ridge_by_default_without_the_refit(digits_mlps):
    res = run(
        "merge", *digits_mlps.paths[:2], "--data", digits_mlps.calib_path, "--no-refit",
        "--json", "-q",
    )  # fmt: skip
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    sel = doc["selection"]
    assert [c["params"]["gamma"] for c in sel["candidates"]] == list(GAMMA_GRID)
    assert doc["params"]["gamma"] in GAMMA_GRID and sel["winner"].startswith("cca(")
    assert doc["num_samples"] + sel["heldout_samples"] == len(digits_mlps.train)


def test_too_few_samples_for_selection_fall_back_to_a_fixed_ridge(digits_mlps, tmp_path):
    res = run(
        "merge", *digits_mlps.paths[:2], "--data", digits_mlps.calib_path, "-n", "100",
        "--no-refit", "--json",
    )  # fmt: skip
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert "selection" not in doc and doc["params"]["gamma"] == 0.1
    assert any("automatic selection needs" in w for w in doc["warnings"])


def test_report_goes_to_stderr_only(digits_mlps):
    res = run("merge", *digits_mlps.paths[:2], "--data", digits_mlps.calib_path)
    assert res.exit_code == 0
    assert res.stdout == ""
    assert "hidden0" in res.stderr and "Timings" in res.stderr


def test_existing_output_needs_force(digits_mlps, tmp_path):
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"keep me")
    args = ["merge", *digits_mlps.paths[:2], "--data", digits_mlps.calib_path, "-o", out]
    res = run(*args)
    assert res.exit_code == 1 and "--force" in res.stderr
    assert out.read_bytes() == b"keep me"
    assert run(*args, "--force").exit_code == 0
    assert out.read_bytes() != b"keep me"


def _one_line_error(res, code=1):
    assert res.exit_code == code, (res.stdout, res.stderr)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.stderr
    return lines[0]


def test_errors_are_one_line(digits_mlps, tmp_path):
    a, b = digits_mlps.paths[:2]
    calib = digits_mlps.calib_path
    msg = _one_line_error(run("merge", a, tmp_path / "nope.pt", "--data", calib))
    assert "does not exist" in msg
    msg = _one_line_error(run("merge", a, b, "--data", calib, "--method", "magic"))
    assert "unknown method 'magic'" in msg
    msg = _one_line_error(run("merge", a, b, "--data", calib, "--arch", "mpl"))
    assert "did you mean 'mlp'" in msg
    wide = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    torch.save({"state_dict": wide.state_dict()}, tmp_path / "wide.pt")
    msg = _one_line_error(run("merge", a, tmp_path / "wide.pt", "--data", calib))
    assert "does not match" in msg
    import numpy as np

    np.savez(tmp_path / "bad.npz", x=np.zeros((10, 50), dtype=np.float32))
    msg = _one_line_error(run("merge", a, b, "--data", tmp_path / "bad.npz"))
    assert "do not fit" in msg
    msg = _one_line_error(run("merge", a, b, "--data", calib, "--weights", "1,x"))
    assert "--weights" in msg


def test_average_needs_no_data(digits_mlps, tmp_path):
    out = tmp_path / "avg.safetensors"
    res = run("merge", *digits_mlps.paths[:2], "--method", "average", "-o", out, "-q")
    assert res.exit_code == 0, res.stderr
    assert out.exists()


def test_containers_and_module_prefix_are_unwrapped(digits_mlps, tmp_path):
    sd = digits_mlps.models[1].state_dict()
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, wrapped)
    from ccamerge.io.files import load_checkpoint

    loaded = load_checkpoint(wrapped)
    assert set(loaded) == set(sd)
    res = run(
        "merge", digits_mlps.paths[0], wrapped, "--data", digits_mlps.calib_path, "--json", "-q"
    )
    assert res.exit_code == 0, res.stderr


def test_archs_lists_registry():
    res = run("archs", "--json")
    assert res.exit_code == 0
    doc = json.loads(res.stdout)
    assert "mlp" in [a["name"] for a in doc["architectures"]]
    assert {"cca", "average"} <= set(doc["methods"])


def test_demo_runs(tmp_path):
    res = run("demo", "--out-dir", tmp_path / "demo", "--json")
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    ev = doc["evaluation"]
    assert ev["merged"]["accuracy"] > ev["average"]["accuracy"]
    merged = tmp_path / "demo" / "merged-cca.safetensors"
    assert merged.exists()
    # the command the demo prints is the default merge and writes the same file
    command = shlex.split(doc["merge_command"])
    assert command[:2] == ["ccamerge", "merge"] and "--gamma" not in command
    again = run(*command[1:], "-q")
    assert again.exit_code == 0, again.stderr
    assert (tmp_path / "demo" / "merged.safetensors").read_bytes() == merged.read_bytes()


def test_method_auto_fallback_ignores_other_methods_parameters(digits_mlps):
    res = run(
        "merge",
        *digits_mlps.paths[:2],
        "--data",
        digits_mlps.calib_path,
        "-n",
        "100",
        "--method",
        "auto",
        "--alpha",
        "0.3",
        "--json",
        "-q",
    )
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["method"] == "cca" and doc["params"]["gamma"] == 0.1


@pytest.mark.parametrize("refit", [True, False])
def test_library_and_cli_defaults_give_the_same_file(digits_mlps, tmp_path, refit):
    """One default policy: ``ccamerge.merge(paths, data=...)`` writes exactly the bytes of
    ``ccamerge merge paths --data ...``: with the refit (the default) a fixed CCA ridge,
    without it (``--no-refit``, ``refit=False``) the ridge chosen on held-out data."""
    paths = [str(p) for p in digits_mlps.paths[:2]]
    by_cli, by_library = tmp_path / "cli.safetensors", tmp_path / "library.safetensors"
    res = runner.invoke(
        app,
        ["merge", *paths, "--data", str(digits_mlps.calib_path), "-o", str(by_cli)]
        + ([] if refit else ["--no-refit"]),
    )
    assert res.exit_code == 0, res.output
    options = {} if refit else {"refit": False}
    result = ccamerge.merge(
        paths, data=str(digits_mlps.calib_path), output=str(by_library), **options
    )
    assert ("refit" in result.report) == refit
    assert ("selection" in result.report) != refit  # the ridge chosen only without the refit
    assert by_library.read_bytes() == by_cli.read_bytes()
