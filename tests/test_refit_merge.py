"""The refit as part of `ccamerge merge` / `apply` / `ccamerge.merge`: options, default
policy, report, saved settings, the fallback, and `--no-refit` against the code before it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from io import BytesIO
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import ccamerge
from ccamerge.cli import app
from ccamerge.io.files import read_metadata
from ccamerge.maths.refit import fit as refit_fit
from ccamerge.pipeline import DEFAULT_MAX_ROWS, DEFAULT_RIDGE, REFIT_GAMMA, load_transforms
from ccamerge.runtime.errors import OptionError, RefitError

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]
# main before the refit was wired into merge and apply: `--no-refit` must reproduce it
BEFORE_REFIT = "a5baf9f7c8b5abf906bd54f1d4eb3e0cba07f334"


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def merge_json(*args) -> dict:
    res = run("merge", *args, "--json", "-q")
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_refit_is_the_default_with_a_fixed_gamma(digits_mlps, tmp_path):
    out = tmp_path / "m.safetensors"
    doc = merge_json(*digits_mlps.paths[:2], "-d", digits_mlps.calib_path, "-o", out)
    assert doc["params"]["gamma"] == REFIT_GAMMA and "selection" not in doc
    refit = doc["refit"]
    assert refit["ridge"] == DEFAULT_RIDGE and refit["max_rows"] == DEFAULT_MAX_ROWS
    assert refit["mode"] == "stored" and refit["seconds"] > 0
    assert [layer["name"] for layer in refit["layers"]] == ["layers.0", "layers.1", "layers.2"]
    for layer in refit["layers"]:
        assert layer["residual_after"] <= layer["residual_before"]
        assert layer["samples"] == doc["num_samples"] and layer["kind"] == "linear"
    assert "refit" in doc["timings"] and "statistics" in doc["timings"]
    assert doc["num_samples"] + doc["check"]["num_samples"] == len(digits_mlps.train)
    assert "REPAIR" not in doc["batchnorm"]
    meta = read_metadata(out)
    assert json.loads(meta["refit"]) == {"ridge": DEFAULT_RIDGE, "max_rows": DEFAULT_MAX_ROWS}


def test_report_renders_the_refit(digits_mlps):
    res = run("merge", *digits_mlps.paths[:2], "-d", digits_mlps.calib_path, "-n", "50")
    assert res.exit_code == 0, res.output
    assert "Refit (stored activations" in res.stderr and "layers.2" in res.stderr
    # 50 samples for 65 inputs: said, in the report's warnings
    assert "layer layers.0: 50 samples for 65 inputs" in res.stderr


def test_explicit_gamma_auto_selects_on_plain_merges_then_refits(digits_mlps):
    doc = merge_json(*digits_mlps.paths[:2], "-d", digits_mlps.calib_path, "--gamma", "auto")
    assert len(doc["selection"]["candidates"]) > 1 and "refit" in doc
    assert doc["num_samples"] + doc["selection"]["heldout_samples"] == len(digits_mlps.train)


def test_without_data_the_refit_is_skipped_with_a_warning(digits_mlps):
    doc = merge_json(*digits_mlps.paths[:2], "-m", "weight-matching")
    assert "refit" not in doc
    assert "refit skipped: no calibration data (--data)" in doc["warnings"]


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--refit-ridge", "nan", "the refit ridge must be finite and non-negative, got nan"),
        ("--refit-ridge", "inf", "the refit ridge must be finite and non-negative, got inf"),
        ("--refit-ridge", "-1", "the refit ridge must be finite and non-negative, got -1.0"),
        ("--refit-max-rows", "-5", "the refit's row limit must be an integer >= 0, got -5"),
    ],
)
def test_bad_refit_options_are_one_line_errors(digits_mlps, tmp_path, option, value, message):
    out = tmp_path / "m.safetensors"
    res = run("merge", *digits_mlps.paths[:2], "-d", digits_mlps.calib_path, "-o", out,
              option, value)  # fmt: skip
    assert res.exit_code == 1 and res.stderr == f"error: {message}\n"
    assert not out.exists()


def test_library_refuses_bad_refit_options(digits_mlps):
    with pytest.raises(OptionError, match="refit ridge"):
        ccamerge.merge(digits_mlps.paths[:2], data=str(digits_mlps.calib_path), refit_ridge=-0.1)


def test_apply_uses_the_recorded_refit_settings(digits_mlps, tmp_path):
    paths = digits_mlps.paths[:2]
    merged, tr, again, plain = (tmp_path / f"{n}.safetensors" for n in ("m", "t", "a", "p"))
    doc = merge_json(*paths, "-d", digits_mlps.calib_path, "-o", merged, "--save-transforms", tr,
                     "--refit-ridge", "0.01", "--refit-max-rows", "300")  # fmt: skip
    assert (doc["refit"]["ridge"], doc["refit"]["max_rows"]) == (0.01, 300)
    recorded = load_transforms(tr).metadata["refit"]
    assert recorded == {"enabled": True, "ridge": 0.01, "max_rows": 300}
    res = run("apply", "-t", tr, *paths, "-d", digits_mlps.calib_path, "-o", again, "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["refit"]["ridge"] == 0.01
    a, b = load_file(merged), load_file(again)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # overridden on the command line: the merge without the refit
    res = run("apply", "-t", tr, *paths, "-d", digits_mlps.calib_path, "-o", plain, "--no-refit",
              "--json")  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "refit" not in json.loads(res.stdout)
    reference = ccamerge.merge(
        [str(p) for p in paths],
        data=str(digits_mlps.calib_path),
        method_params={"gamma": REFIT_GAMMA},
        refit=False,
    )
    assert all(torch.equal(v, reference.state_dict[k]) for k, v in load_file(plain).items())


def _raise_refit_error(*args, **kwargs):
    raise RefitError("Net.forward cannot be traced (test)")


@pytest.mark.parametrize(
    ("net", "gamma"), [("mlp", "0.1"), ("mlp", "auto"), ("resnet_cifar", "0.1")]
)
def test_refit_error_falls_back_to_the_merge_without_it(
    digits_mlps, digits_convnets, tmp_path, monkeypatch, net, gamma
):
    """The file equals the `--no-refit` file: REPAIR (MLP), BatchNorm renormalisation with
    the statistics the refit had made unnecessary (ResNet); with `--gamma auto`, the
    selection's winner as it was scored."""
    if net == "mlp":
        paths, data = digits_mlps.paths[:2], digits_mlps.calib_path
    else:
        paths, data = digits_convnets.nets[net].paths, digits_convnets.calib_path
    plain, fallback = tmp_path / "plain.safetensors", tmp_path / "fallback.safetensors"
    common = [*paths, "-d", data, "--gamma", gamma, "--batch-size", "128"]
    merge_json(*common, "--no-refit", "-o", plain)
    monkeypatch.setattr(refit_fit, "make_plan", _raise_refit_error)
    doc = merge_json(*common, "-o", fallback)
    assert "refit skipped: Net.forward cannot be traced (test)" in doc["warnings"]
    assert "refit" not in doc
    assert ("REPAIR" if net == "mlp" else "renormalised") in doc["batchnorm"]
    assert fallback.read_bytes() == plain.read_bytes()


def _checkout(commit: str, into: Path) -> Path:
    """The ``ccamerge`` package as it was at ``commit`` (skip without the git history)."""
    try:
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", commit, "ccamerge"],
            capture_output=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"commit {commit[:7]} of the repository is not available")
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def test_no_refit_equals_the_merge_before_the_refit(digits_mlps, digits_convnets, tmp_path):
    """`--no-refit` writes the bytes that the code before the refit wrote, for its default
    policy (MLP: gamma chosen on held-out data, REPAIR) and a BatchNorm ResNet (renorm);
    with `--no-check`, which fits on every calibration sample as that code did (with a
    selection the check reuses its held-out part, so the MLP's bytes are the same either
    way)."""
    old = _checkout(BEFORE_REFIT, tmp_path / "before")
    resnet = digits_convnets.nets["resnet_cifar"].paths
    jobs = {
        "mlp": ([str(p) for p in digits_mlps.paths[:2]], str(digits_mlps.calib_path), {}),
        "resnet": (
            [str(p) for p in resnet],
            str(digits_convnets.calib_path),
            {"method_params": {"gamma": 0.1}},
        ),
    }
    script = (  # with this process's thread count: another can round sums differently
        "import json, sys, torch, ccamerge\n"
        "torch.set_num_threads(int(sys.argv[2]))\n"
        "for out, (paths, data, opts) in json.loads(sys.argv[1]).items():\n"
        "    ccamerge.merge(paths, data=data, output=out, batch_size=128, **opts)\n"
    )
    by_old = {str(tmp_path / f"old-{name}.safetensors"): job for name, job in jobs.items()}
    threads = str(torch.get_num_threads())
    env = {**os.environ, "PYTHONPATH": str(old)}
    subprocess.run([sys.executable, "-c", script, json.dumps(by_old), threads], env=env,
                   check=True, cwd=tmp_path, timeout=600)  # fmt: skip
    for name, (paths, data, opts) in jobs.items():
        new = tmp_path / f"new-{name}.safetensors"
        ccamerge.merge(
            paths, data=data, output=str(new), batch_size=128, refit=False, check=name == "mlp",
            **opts,
        )  # fmt: skip
        assert new.read_bytes() == (tmp_path / f"old-{name}.safetensors").read_bytes(), name
