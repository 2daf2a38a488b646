"""Every file a command writes goes through one guard (never an input of the run, never
two outputs on one path, never an existing file without --force); merged models are
written as .safetensors or as plain .pt/.pth/.bin state dicts; `--data -` and `-o -`
work in shell pipelines."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load, load_file, save
from test_bad_input import Env, refused, run, snapshot


@pytest.fixture
def env(tmp_path) -> Env:
    torch.set_num_threads(1)
    return Env(tmp_path)


def digests(*paths) -> dict:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def test_no_output_lands_on_an_input_or_another_output(env):
    spec = env.root / "spec.json"
    assert run("merge", env.a, env.b, "--method", "average", "--spec-out", spec).exit_code == 0
    evald = env.npz("eval.npz", x=env.x, y=env.y)
    inputs = [env.a, env.b, env.data, evald, spec]
    before = digests(*inputs)
    common = (env.a, env.b, "--data", env.data, "--eval-data", evald, "--gamma", "0.1")
    cases = [
        (("--spec-out", env.a), f"error: --spec-out {env.a} is also an input; choose another path"),
        (
            ("--spec-out", env.data),
            f"error: --spec-out {env.data} is also an input; choose another path",
        ),
        (
            ("-o", env.data, "--force"),
            f"error: output {env.data} must end in one of .safetensors, .pt, .pth, .bin, /",
        ),
        (
            ("--spec", spec, "--spec-out", spec, "--force"),
            f"error: --spec-out {spec} is also an input; choose another path",
        ),
        (
            ("-o", env.out, "--spec-out", env.out),
            f"error: output and --spec-out name the same file {env.out}",
        ),
        (
            ("-o", env.out, "--save-transforms", env.out),
            f"error: output and --save-transforms name the same file {env.out}",
        ),
        (
            ("--spec-out", env.existing),
            f"error: --spec-out {env.existing} exists; pass --force to overwrite it",
        ),
    ]
    for args, message in cases:
        assert refused(run("merge", *common, *args)) == message
    # -o on the calibration data, even with --force, when it is a .pt file
    calib = env.root / "calib.pt"
    torch.save({"x": torch.as_tensor(env.x)}, calib)
    res = run("merge", env.a, env.b, "-d", calib, "-o", calib, "--force", "--gamma", "0.1")
    assert refused(res) == f"error: output {calib} is also an input; choose another path"
    assert digests(*inputs) == before
    env.unchanged()


def test_apply_output_is_never_its_data(env):
    transforms = env.root / "t.safetensors"
    res = run(
        "merge", env.a, env.b, "--data", env.data, "--gamma", "0.1", "--save-transforms", transforms
    )
    assert res.exit_code == 0, res.stderr
    calib = env.root / "calib.pt"
    torch.save({"x": torch.as_tensor(env.x)}, calib)
    before = digests(calib, transforms)
    res = run("apply", "--transforms", transforms, env.a, env.b, "-d", calib, "-o", calib, "-f")
    assert refused(res) == f"error: output {calib} is also an input; choose another path"
    assert digests(calib, transforms) == before


def test_barrier_files_need_force(env):
    csv = env.out_dir / "b.csv"
    csv.write_text("an earlier table\n")
    env.before = snapshot(env.out_dir)
    args = (
        "barrier",
        env.a,
        env.b,
        "--eval-data",
        env.data,
        "--methods",
        "average",
        "--steps",
        "3",
    )
    assert (
        refused(run(*args, "--csv", csv))
        == f"error: --csv {csv} exists; pass --force to overwrite it"
    )
    env.unchanged()
    res = run(*args, "--csv", csv, "--force", "-q")
    assert res.exit_code == 0, res.stderr
    assert csv.read_text().startswith("method,")


def test_inspect_spec_out_needs_force(env):
    spec = env.out_dir / "spec.json"
    spec.write_text("{}")
    env.before = snapshot(env.out_dir)
    assert refused(run("inspect", env.a, "--spec-out", spec)) == (
        f"error: --spec-out {spec} exists; pass --force to overwrite it"
    )
    env.unchanged()
    assert refused(run("inspect", env.a, "--spec-out", env.a, "--force")) == (
        f"error: --spec-out {env.a} is also an input; choose another path"
    )
    assert run("inspect", env.a, "--spec-out", spec, "--force").exit_code == 0
    assert json.loads(spec.read_text())["format"]


# --- .pt / .pth / .bin outputs ---------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
def test_torch_outputs_are_plain_state_dicts(env, suffix):
    out = env.out_dir / f"merged{suffix}"
    res = env.merge(out=out)
    assert res.exit_code == 0, res.stderr
    sd = torch.load(out, weights_only=True)
    reference = env.root / "ref.safetensors"
    assert env.merge(out=reference).exit_code == 0
    expected = load_file(reference)
    assert set(sd) == set(expected)
    assert all(torch.equal(sd[k], expected[k]) for k in sd)
    first = out.read_bytes()  # byte-identical on a rerun, like the safetensors output
    assert env.merge("--force", out=out).exit_code == 0
    assert out.read_bytes() == first


def test_missing_data_names_both_ways_on(env):
    out = env.out_dir / "m.pt"
    res = run("merge", env.a, env.b, "-o", out)
    assert refused(res) == (
        "error: method 'cca' needs calibration data: pass model-ready inputs with --data FILE "
        "(.npz, .npy, .pt, .safetensors; '-' reads standard input), or merge without data with "
        "--method average or weight-matching"
    )
    env.unchanged()
    assert run("merge", env.a, env.b, "-o", out, "--method", "average").exit_code == 0


# --- pipelines: --data - and -o - -------------------------------------------------------


def merge_from_stdin(env: Env, *args, stdin: bytes) -> subprocess.CompletedProcess:
    """``ccamerge merge A B --data - ARGS`` in a subprocess, ``stdin`` on its standard input."""
    code = "import sys; sys.argv[0] = 'ccamerge'; from ccamerge.cli import main; main()"
    command = [sys.executable, "-c", code, "merge", str(env.a), str(env.b), "--data", "-"]
    return subprocess.run(
        [*command, *map(str, args)],
        input=stdin,
        capture_output=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_data_from_stdin_and_model_to_stdout(env):
    res = merge_from_stdin(env, "--gamma", "0.1", "-o", "-", "-q", stdin=env.data.read_bytes())
    assert res.returncode == 0, res.stderr
    from_pipe = load(res.stdout)
    assert env.merge().exit_code == 0  # the same merge from files
    from_files = load_file(env.out)
    assert set(from_pipe) == set(from_files)
    assert all(torch.equal(from_pipe[k], from_files[k]) for k in from_pipe)
    env.out.unlink()
    res = merge_from_stdin(env, "-o", "-", "--json", stdin=env.data.read_bytes())
    assert res.returncode == 1 and res.stdout == b""
    assert res.stderr.decode().strip() == (
        "error: -o - writes the merged model on standard output; --json cannot share it "
        "(the report goes to stderr)"
    )
    res = merge_from_stdin(env, "--gamma", "0.1", stdin=b"not data at all")
    assert res.returncode == 1
    assert res.stderr.decode().strip().startswith("error: data file - (standard input) ")
    env.unchanged()


@pytest.mark.parametrize("fmt", ["npy", "pt", "safetensors"])
def test_stdin_data_formats(env, fmt):
    buffer = io.BytesIO()
    if fmt == "npy":
        np.save(buffer, env.x)
    elif fmt == "pt":
        torch.save({"x": torch.as_tensor(env.x)}, buffer)
    else:
        buffer.write(save({"x": torch.as_tensor(env.x)}))
    res = merge_from_stdin(env, "--gamma", "0.1", "--json", "-q", stdin=buffer.getvalue())
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["num_samples"] + doc["check"]["num_samples"] == len(env.x)


def test_demo_replaces_files_only_with_force(tmp_path):
    folder = tmp_path / "demo"
    folder.mkdir()
    stale = folder / "calib.npz"
    stale.write_bytes(b"the user's own file")
    (folder / "notes.txt").write_bytes(b"not the demo's")
    before = snapshot(folder)
    line = refused(run("demo", "--out-dir", folder, "--models", "2"))
    assert line == f"error: --out-dir {stale} exists; pass --force to overwrite it"
    assert snapshot(folder) == before

    res = run("demo", "--out-dir", folder, "--models", "2", "--force", "--json")
    assert res.exit_code == 0, res.stderr
    written = snapshot(folder)
    assert set(written) == {
        "calib.npz", "test.npz", "model0.pt", "model1.pt", "notes.txt",
        "merged-average.safetensors", "merged-cca.safetensors",
    }  # fmt: skip
    assert written["notes.txt"] == before["notes.txt"]
    assert np.load(stale)["x"].shape[1] == 64
    doc = json.loads(res.stdout)
    assert doc["output"] == str(folder / "merged-cca.safetensors")
    assert set(torch.load(folder / "model0.pt", weights_only=True)) == set(load_file(doc["output"]))

    line = refused(run("demo", "--out-dir", folder, "--models", "2"))
    assert line == f"error: --out-dir {stale} exists; pass --force to overwrite it"
    assert snapshot(folder) == written


def test_demo_out_dir_that_is_a_file(tmp_path):
    path = tmp_path / "demo"
    path.write_bytes(b"a file")
    line = refused(run("demo", "--out-dir", path))
    assert line == f"error: --out-dir {path} is a file, not a folder"
    assert path.read_bytes() == b"a file"
