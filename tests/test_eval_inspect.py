"""``ccamerge eval`` and ``ccamerge inspect``: JSON fields, values, errors (each naming\nonly its own command's options), help."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from cli_run import refused
from cli_run import run as cli_run
from typer.testing import CliRunner

from ccamerge.cli import app
from ccamerge.io.files import load_data
from ccamerge.models.custom import load_factory
from ccamerge.pipeline import ensemble_logits, evaluate, predict_logits, score_logits
from ccamerge.runs.inspection import inspect_checkpoint
from ccamerge.runs.remedies import REMEDIES
from ccamerge.runtime.errors import MISSING

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_eval_scores_each_checkpoint_and_the_ensemble(digits_mlps):
    res = run(
        "eval", *digits_mlps.paths[:3], "--data", digits_mlps.test_path, "--ensemble", "--json"
    )
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    test = load_data(digits_mlps.test_path)
    assert doc["num_samples"] == len(test) and doc["architecture"] == "mlp"
    assert [m["path"] for m in doc["models"]] == [str(p) for p in digits_mlps.paths[:3]]
    for entry, model in zip(doc["models"], digits_mlps.models):
        score = evaluate(model, test)
        assert (entry["accuracy"], entry["loss"]) == (score.accuracy, score.loss)
    logits = [predict_logits(m, test) for m in digits_mlps.models[:3]]
    ens = score_logits(ensemble_logits(logits), test.y)
    assert doc["ensemble"]["accuracy"] == ens.accuracy
    assert doc["ensemble"]["loss"] == pytest.approx(ens.loss, rel=1e-12)
    assert "ensemble" in res.stderr  # the table goes to stderr


def test_eval_without_ensemble_has_no_ensemble_entry(digits_mlps):
    res = run("eval", digits_mlps.paths[0], "--data", digits_mlps.test_path, "--json")
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert "ensemble" not in doc and len(doc["models"]) == 1


def test_eval_errors(digits_mlps, tmp_path):
    unlabelled = tmp_path / "x.npz"
    np.savez(unlabelled, x=load_data(digits_mlps.test_path).x.numpy())
    res = run("eval", digits_mlps.paths[0], "--data", unlabelled)
    assert res.exit_code == 1 and res.stderr.startswith("error:") and "labels" in res.stderr
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, x=np.zeros((4, 10), np.float32), y=np.zeros(4, np.int64))
    res = run("eval", digits_mlps.paths[0], "--data", wrong)
    assert res.exit_code == 1 and "do not fit" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_inspect_json_describes_the_mlp(digits_mlps):
    res = run("inspect", digits_mlps.paths[0], "--json")
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["architecture"]["name"] == "mlp"
    assert doc["architecture"]["config"]["sizes"] == [64, 64, 64, 10]
    assert doc["input_shape"] == [64]
    assert doc["num_parameters"] == sum(p.numel() for p in digits_mlps.models[0].parameters())
    assert doc["num_parameters"] == 64 * 64 + 64 + 64 * 64 + 64 + 64 * 10 + 10
    assert doc["num_tensors"] == 6 and doc["num_buffer_values"] == 0
    groups = {g["name"]: g for g in doc["groups"]}
    assert set(groups) == {"hidden0", "hidden1"}
    h0 = groups["hidden0"]
    assert h0["size"] == 64 and h0["collect_at"] == "layers.1" and h0["collect_on"] == "input"
    assert h0["members"] == [
        {"tensor": "layers.0.weight", "axis": 0, "role": "output", "shape": [64, 64]},
        {"tensor": "layers.0.bias", "axis": 0, "role": "output", "shape": [64]},
        {"tensor": "layers.1.weight", "axis": 1, "role": "input", "shape": [64, 64]},
    ]
    assert doc["ungrouped"] == ["layers.2.bias"]
    # the view names the architecture and every group, on stdout (its product)
    res = run("inspect", digits_mlps.paths[0])
    assert res.exit_code == 0 and res.stderr == ""
    assert "mlp" in res.stdout and "hidden0" in res.stdout and "hidden1" in res.stdout
    assert "\x1b[" not in res.stdout  # plain text when stdout is not a terminal


def test_inspect_lists_a_group_s_first_members_and_counts_the_rest(tmp_path):
    """A VGG group has 6 member tensors (conv weight and bias, 4 BatchNorm tensors, the
    next conv's weight: 7); the view lists the first 4 and a count, --verbose all."""
    from ccamerge.models.archs.vgg import vgg_config
    from ccamerge.models.registry import get_architecture

    cfg = vgg_config(convs_per_stage=(1, 1), widths=(4, 8), num_classes=3, in_channels=1)
    path = tmp_path / "vgg.pt"
    torch.save(get_architecture("vgg").build(cfg).state_dict(), path)
    members = [
        f"{m['tensor']}:{m['axis']}" for m in inspect_checkpoint(str(path))["groups"][0]["members"]
    ]
    assert len(members) > 4
    short, full = run("inspect", path), run("inspect", path, "--verbose")
    assert short.exit_code == 0 and full.exit_code == 0
    assert " ".join(members[:4]) + f" ... {len(members) - 4} more" in short.stdout
    assert members[-1] not in short.stdout
    assert " ".join(members) in full.stdout and "more" not in full.stdout


def test_inspect_lists_batchnorm_members_and_buffers(tmp_path):
    from ccamerge.models.archs.vgg import vgg_config
    from ccamerge.models.registry import get_architecture

    cfg = vgg_config(convs_per_stage=(1, 1), widths=(4, 8), num_classes=3, in_channels=1)
    model = get_architecture("vgg").build(cfg)
    path = tmp_path / "vgg.pt"
    torch.save(model.state_dict(), path)
    info = inspect_checkpoint(str(path))
    assert info["architecture"]["name"] == "vgg"
    assert info["num_parameters"] == sum(p.numel() for p in model.parameters())
    assert info["num_buffer_values"] == sum(b.numel() for b in model.buffers()) > 0
    assert [g["size"] for g in info["groups"]] == [4, 8]
    first = info["groups"][0]
    assert first["norms"] == ["features.1"]
    assert {"tensor": "features.1.running_var", "axis": 0, "role": "output", "shape": [4]} in (
        first["members"]
    )


def test_inspect_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.pt"
    torch.save({"foo.weight": torch.zeros(3, 3, 3)}, bad)
    res = run("inspect", bad)
    assert res.exit_code == 1
    assert res.stderr.startswith("error:") and len(res.stderr.strip().splitlines()) == 1
    res = run("inspect", tmp_path / "missing.pt")
    assert res.exit_code == 1 and "does not exist" in res.stderr


@pytest.mark.parametrize("command", ["eval", "inspect", "barrier"])
def test_help(command):
    res = run(command, "--help")
    assert res.exit_code == 0 and "Usage" in res.stdout


# --- an error names only the options of its own command ----------------------------------

NETS = f"{Path(__file__).parent / 'custom_nets.py'}"
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z-]*")


def options_of(command: str) -> set[str]:
    """Every flag of ``ccamerge COMMAND`` (from the typer app itself)."""
    click_command = typer.main.get_command(app).commands[command]
    return {o for p in click_command.params for o in (*p.opts, *p.secondary_opts)}


def test_every_remedy_names_only_its_own_commands_options():
    for command, how in REMEDIES.items():
        for missing, text in how.items():
            assert missing in MISSING
            assert set(FLAG.findall(text)) <= options_of(command), (command, text)


def refused_naming_own_options(res, command: str) -> str:
    line = refused(res)
    assert set(FLAG.findall(line)) <= options_of(command), line
    return line


def test_inspect_asks_for_its_own_input_shape_option(tmp_path):
    ckpt = tmp_path / "conv.pt"
    torch.save(load_factory(f"{NETS}:make_convnet")(width=3).state_dict(), ckpt)
    res = cli_run(
        "inspect", ckpt, "--model", f"{NETS}:make_convnet", "--model-args", '{"width": 3}'
    )
    line = refused_naming_own_options(res, "inspect")
    assert line == (
        "error: cannot tell the input shape of ConvNet; give one sample's shape with "
        "--input-shape, e.g. 3,32,32"
    )
    res = cli_run("merge", ckpt, ckpt, "-m", "average", "--model", f"{NETS}:make_convnet",
                  "--model-args", '{"width": 3}')  # fmt: skip
    assert refused_naming_own_options(res, "merge") == (
        "error: cannot tell the input shape of ConvNet; give calibration data (--data) or a "
        "spec file (--spec)"
    )


def test_an_untraceable_model_is_refused_in_each_commands_words(tmp_path):
    ckpt = tmp_path / "gated.pt"
    torch.save(load_factory(f"{NETS}:make_gated")().state_dict(), ckpt)
    line = refused_naming_own_options(
        cli_run("inspect", ckpt, "--model", f"{NETS}:make_gated", "--input-shape", "8"), "inspect"
    )
    assert line.startswith("error: torch.fx cannot trace Gated.forward")
    assert line.endswith("a merge can take them written by hand (docs/custom-models.md)")
    data = tmp_path / "x.npz"
    np.savez(data, x=np.ones((4, 8), np.float32))
    res = cli_run("merge", ckpt, ckpt, "-d", data, "--model", f"{NETS}:make_gated")
    assert refused_naming_own_options(res, "merge").endswith(
        "write its feature groups by hand and pass them with --spec (docs/custom-models.md)"
    )


@pytest.mark.parametrize("command", ["inspect", "eval", "merge", "barrier"])
def test_an_unknown_network_is_refused_in_each_commands_words(tmp_path, command):
    ckpt = tmp_path / "odd.pt"
    torch.save({"foo.weight": torch.zeros(3, 3, 3)}, ckpt)
    args = {
        "inspect": [ckpt],
        "eval": [ckpt, "--data", ckpt],
        "merge": [ckpt, ckpt, "-m", "average"],
        "barrier": [ckpt, ckpt, "--eval-data", ckpt, "--methods", "average"],
    }[command]
    line = refused_naming_own_options(cli_run(command, *args), command)
    if "--model" in options_of(command):
        assert line.endswith("pass --model pkg.module:factory (docs/custom-models.md)")
    else:
        assert line.endswith(f"{command} takes the registered architectures only "
                             "(`ccamerge archs` lists them)")  # fmt: skip
