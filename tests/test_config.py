"""``--config FILE``: settings from TOML (or YAML), the flags' names as keys; flags win."""

from __future__ import annotations

import json
import sys

import pytest
from cli_run import refused, run


@pytest.fixture
def toml(digits_mlps, tmp_path):
    """A merge's settings as a TOML file, and the same merge's flags."""
    a, b = (str(p) for p in digits_mlps.paths[:2])
    path = tmp_path / "merge.toml"
    path.write_text(
        f'checkpoints = ["{a}", "{b}"]\n'
        'method = "cca"\n'
        f'data = "{digits_mlps.calib_path}"\n'
        "num-samples = 600\n"
        "batch_size = 128\n"
        "refit = false\n"
        "[params]\n"
        "gamma = 0.3\n"
    )
    flags = [a, b, "-m", "cca", "-d", digits_mlps.calib_path, "-n", 600, "--batch-size", 128,
             "--no-refit", "--param", "gamma=0.3"]  # fmt: skip
    return path, flags


def test_a_toml_file_gives_the_merge_of_the_same_flags(toml, tmp_path):
    path, flags = toml
    by_file, by_flags = tmp_path / "file.safetensors", tmp_path / "flags.safetensors"
    res = run("merge", "--config", path, "-o", by_file, "-q")
    assert res.exit_code == 0, res.stderr
    assert run("merge", *flags, "-o", by_flags, "-q").exit_code == 0
    assert by_file.read_bytes() == by_flags.read_bytes()


def test_flags_on_the_command_line_win_over_the_file(toml):
    path, _ = toml
    doc = json.loads(run("merge", "--config", path, "--json", "-q").stdout)
    assert doc["params"]["gamma"] == 0.3 and "refit" not in doc
    assert doc["num_samples"] + doc["check"]["num_samples"] == 600
    res = run("merge", "--config", path, "-n", 500, "--refit", "--param", "ridge=absolute",
              "--gamma", 2, "--json", "-q")  # fmt: skip
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    # parameters merge key by key: the file's are kept unless the command line sets them
    assert doc["params"] == {"gamma": 2.0, "ridge": "absolute"}
    assert doc["num_samples"] + doc["check"]["num_samples"] == 500 and "refit" in doc


def test_alias_keys_and_dashes_or_underscores(digits_mlps, tmp_path):
    path = tmp_path / "m.toml"
    path.write_text('method = "zipit"\nalpha = 0.25\n[params]\nbeta = 0.125\n')
    res = run("merge", *digits_mlps.paths[:2], "--config", path, "-d", digits_mlps.calib_path,
              "--json", "-q")  # fmt: skip
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["params"] == {"alpha": 0.25, "beta": 0.125}


def test_a_yaml_file_reads_like_the_toml_one(toml, tmp_path):
    pytest.importorskip("yaml")
    _, flags = toml
    path = tmp_path / "merge.yaml"
    path.write_text(
        f"checkpoints: [{flags[0]}, {flags[1]}]\nmethod: cca\ndata: {flags[5]}\n"
        "num_samples: 600\nbatch-size: 128\nrefit: false\nparams:\n  gamma: 0.3\n"
    )
    by_file, by_flags = tmp_path / "file.safetensors", tmp_path / "flags.safetensors"
    res = run("merge", "--config", path, "-o", by_file, "-q")
    assert res.exit_code == 0, res.stderr
    assert run("merge", *flags, "-o", by_flags, "-q").exit_code == 0
    assert by_file.read_bytes() == by_flags.read_bytes()


def test_yaml_without_pyyaml_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "yaml", None)  # `import yaml` raises ImportError
    path = tmp_path / "m.yml"
    path.write_text("method: cca\n")
    assert refused(run("merge", "--config", path)) == (
        f"error: --config {path}: reading YAML needs PyYAML: pip install ccamerge[yaml]"
    )


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "bogus = 1\n",
            "unknown key 'bogus' (valid: activation, alpha, arch, augment, batch-size, beta, ",
        ),
        ('num-samples = "many"\n', "num-samples = 'many': Input should be a valid integer"),
        ("num-samples = [1, 2]\n", "num-samples expects a single value, got [1, 2]"),
        ("refit = 1\n", "refit expects true or false, got 1"),
        ('checkpoints = "a.pt"\n', "checkpoints expects a list, got 'a.pt'"),
        ("params = 3\n", "params expects a table (KEY = VALUE lines)"),
        (
            "[params]\nfoo = 1\n",
            "params.foo: method 'cca' takes no parameter foo (its parameters: gamma, ridge)",
        ),
        (
            "[params]\ngamma = true\n",
            "params.gamma must be a number, got True (parameters of 'cca': gamma, ridge)",
        ),
        (
            "gamma = 1\n[params]\ngamma = 2\n",
            "parameter gamma given twice (gamma and params.gamma)",
        ),
        ("method = \n", "not valid TOML (Invalid value (at line 1, column 10))"),
    ],
)
def test_a_wrong_file_is_a_one_line_error(digits_mlps, tmp_path, text, message):
    path = tmp_path / "m.toml"
    path.write_text(text)
    out = tmp_path / "out.safetensors"
    res = run("merge", *digits_mlps.paths[:2], "--config", path, "-o", out)
    line = refused(res)
    assert line.startswith("error: ") and message in line, line
    assert not out.exists()


def test_a_missing_or_unknown_kind_of_file_is_a_one_line_error(tmp_path):
    missing = tmp_path / "nope.toml"
    assert refused(run("merge", "--config", missing)) == (
        f"error: --config {missing}: cannot read it (No such file or directory)"
    )
    other = tmp_path / "m.json"
    other.write_text("{}")
    assert refused(run("merge", "--config", other)) == (
        f"error: --config {other}: expects a .toml, .yaml or .yml file"
    )


def test_barrier_and_apply_take_a_config_file(digits_mlps, tmp_path):
    a, b = (str(p) for p in digits_mlps.paths[:2])
    barrier = tmp_path / "barrier.toml"
    barrier.write_text(
        f'checkpoint_a = "{a}"\ncheckpoint-b = "{b}"\neval-data = "{digits_mlps.test_path}"\n'
        f'data = "{digits_mlps.calib_path}"\nmethods = "average,zipit"\nsteps = 3\n'
        "[params]\nalpha = 0.75\n"
    )
    res = run("barrier", "--config", barrier, "--json", "-q")
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["t"] == [0.0, 0.5, 1.0] and doc["methods"]["zipit"]["alpha"] == 0.75

    transforms = tmp_path / "t.safetensors"
    res = run("merge", a, b, "-m", "permute", "-d", digits_mlps.calib_path,
              "--save-transforms", transforms, "-q")  # fmt: skip
    assert res.exit_code == 0, res.stderr
    apply = tmp_path / "apply.toml"
    apply.write_text(f'transforms = "{transforms}"\ncheckpoints = ["{a}", "{b}"]\n')
    res = run("apply", "--config", apply, "--weights", "1,0", "--json", "-q")
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["weights"] == [1.0, 0.0]
    apply.write_text("[params]\ngamma = 1\n")  # apply takes no method parameters
    line = refused(run("apply", "--config", apply))
    assert "unknown key 'params' (valid: batch-size, " in line and "transforms" in line
