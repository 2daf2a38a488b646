"""The rich report: many warnings of one kind are one line (``--verbose`` lists them all;
the JSON keeps every warning as written); tables are plain columns when piped and
rich's boxes fitted to a terminal's width."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
import torch
from cli_run import run
from rich.console import Console

from ccamerge.models.archs.mlp import MLP
from ccamerge.runs.report import (
    evaluation_table,
    group_warnings,
    print_table,
    warning_kind,
    warning_lines,
)

KEEPS = "keeps its averaged weights: its parameters are also used outside the module"
LAYERS = [f"layer{i}.{j}.conv{k}" for i in (1, 2, 3) for j in (0, 1) for k in (1, 2)]


def test_one_fstring_for_different_names_is_one_kind():
    assert warning_kind(f"layer layer1.0.conv1 {KEEPS}") == warning_kind(f"layer fc2 {KEEPS}")
    quoted = [f"read the tensors under '{p}' as the model" for p in ("model", "net.body")]
    assert warning_kind(quoted[0]) == warning_kind(quoted[1])
    rows = "group {}: {} activation rows for {} units per model; the covariance is singular"
    assert warning_kind(rows.format("hidden0", 20, 64)) == warning_kind(rows.format("b.1", 7, 8))


def test_different_prose_is_another_kind():
    assert warning_kind(f"layer fc1 {KEEPS}") != warning_kind(
        "layer fc1 keeps its averaged weights: the least-squares solve was not finite"
    )
    assert warning_kind("the covariance is singular") != warning_kind("the covariance is wrong")
    # an apostrophe is not a quote: the rest of the sentence stays prose
    assert warning_kind("the model's input doesn't fit") != warning_kind(
        "the model's output doesn't fit"
    )


def test_grouping_keeps_order_and_joins_a_plain_name():
    warnings = [f"layer {n} {KEEPS}" for n in LAYERS[:2]]
    warnings += ["refit skipped: no calibration data (--data)", f"layer fc {KEEPS}"]
    warnings += [f"layer {n} {KEEPS}" for n in LAYERS[2:]]
    groups = group_warnings(warnings)
    assert [len(g.messages) for g in groups] == [len(LAYERS) + 1, 1]
    assert groups[0].messages[2] == f"layer fc {KEEPS}"
    assert groups[0].names() == [*LAYERS[:2], "fc", *LAYERS[2:]]
    assert groups[1].messages == ["refit skipped: no calibration data (--data)"]


def test_names_skip_numbers_and_come_once():
    dead = "group {}: {} of 16 units of model {} are constant on the calibration data"
    warnings = [dead.format(g, n, k) for g in ("h0", "h1") for k, n in ((0, 3), (1, 5))]
    (group,) = group_warnings(warnings)
    assert group.names() == ["h0", "h1"]
    same = group_warnings(["refit skipped: no calibration data (--data)"] * 5)
    assert same[0].names() == []
    assert same[0].summary().endswith("(5 times; --verbose lists all)")


def test_a_kind_of_more_than_three_is_one_summary_line():
    many = [f"layer {n} {KEEPS}" for n in LAYERS]  # 12
    few = [f"checkpoint {k} (m{k}.pt) is not the file the transforms were computed for" for k in (0, 1, 2)]  # fmt: skip
    lines = warning_lines([*many, *few])
    assert lines[0] == (
        f"layer {LAYERS[0]} {KEEPS} (12 warnings like it: layer1.0.conv1, layer1.0.conv2, "
        "layer1.1.conv1 and 9 more; --verbose lists all)"
    )
    assert lines[1:] == few  # three of a kind stay as they are
    assert warning_lines([*many, *few], verbose=True) == [*many, *few]


# --- the command line -------------------------------------------------------------------


@pytest.fixture
def deep_mlps(tmp_path):
    """Two untrained MLPs with five hidden layers: 20 calibration samples give one
    'activation rows' warning per group and dead-unit warnings per group and model."""
    torch.set_num_threads(1)
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        paths.append(tmp_path / f"m{seed}.pt")
        torch.save(MLP([8, 16, 16, 16, 16, 16, 3]).state_dict(), paths[-1])
    rng = np.random.RandomState(0)
    data = tmp_path / "calib.npz"
    np.savez(data, x=rng.randn(200, 8).astype(np.float32), y=rng.randint(0, 3, 200))
    return [*paths, "--data", data, "-n", 20, "--json"]


def warning_lines_of(stderr: str) -> list[str]:
    prefix = "warning: "
    return [line[len(prefix) :] for line in stderr.splitlines() if line.startswith(prefix)]


def test_merge_report_collapses_and_verbose_lists_all(deep_mlps):
    res = run("merge", *deep_mlps)
    assert res.exit_code == 0, res.stderr
    warnings = json.loads(res.stdout)["warnings"]  # the JSON keeps every one
    rows = [w for w in warnings if "activation rows for 16 units" in w]
    assert len(rows) == 5
    shown = warning_lines_of(res.stderr)
    assert len(shown) < len(warnings)
    assert (
        f"{rows[0]} (5 warnings like it: hidden0, hidden1, hidden2 and 2 more; --verbose lists all)"
    ) in shown
    verbose = run("merge", *deep_mlps, "--verbose")
    assert verbose.exit_code == 0, verbose.stderr
    assert json.loads(verbose.stdout)["warnings"] == warnings
    assert warning_lines_of(verbose.stderr) == warnings


@pytest.mark.parametrize("command", ["merge", "apply", "barrier"])
def test_verbose_is_an_option_of_the_reporting_commands(command):
    res = run(command, "--help")
    assert res.exit_code == 0 and "--verbose" in res.stdout


# --- tables ---------------------------------------------------------------------------

BOX_DRAWING = re.compile("[\u2500-\u257f]")


def test_piped_tables_have_no_box_drawing_characters(deep_mlps, tmp_path):
    """Every table of merge (groups, refit, evaluation, timings), barrier, eval and inspect,
    printed where no terminal is (the test runner's pipes)."""
    a, b, _, data = deep_mlps[:4]
    runs = {
        "merge": run("merge", *deep_mlps[:6], "--eval-data", data, "-o", tmp_path / "m.pt"),
        "barrier": run(
            "barrier", a, b, "--eval-data", data, "--methods", "average", "--steps", 3
        ),  # fmt: skip
        "eval": run("eval", a, b, "--data", data, "--ensemble"),
        "inspect": run("inspect", a),
    }
    for command, res in runs.items():
        assert res.exit_code == 0, (command, res.stderr)
        text = res.stdout + res.stderr
        assert not BOX_DRAWING.search(text), (command, text)
    lines = runs["merge"].stderr.splitlines()
    header = lines.index("Feature groups") + 1  # the title on its own line, then the rows
    assert lines[header].split() == ["group", "size", "mean", "corr", "min", "corr", "cond"]
    assert lines[header + 1].split()[:2] == ["hidden0", "16"]
    assert any(line.startswith("Refit (") and line.endswith("/ |t|^2") for line in lines)


def test_piped_table_rows_stay_whole():
    long_path = "/data/" + "a_long_folder_name/" * 8 + "model.safetensors"
    evaluation = {"num_samples": 10, "models": [{"path": long_path, "accuracy": 0.5, "loss": 1.0}]}
    out = io.StringIO()
    print_table(evaluation_table(evaluation), Console(file=out, width=40))
    lines = out.getvalue().splitlines()
    assert lines[0] == "Evaluation (10 samples)"
    assert lines[2].split() == [long_path, "50.00", "1.0000"]
    assert not BOX_DRAWING.search(out.getvalue())


def test_terminal_tables_fit_its_width_and_lose_nothing():
    long_path = "/data/" + "a_long_folder_name/" * 8 + "model.safetensors"
    evaluation = {"num_samples": 10, "models": [{"path": long_path, "accuracy": 0.5, "loss": 1.0}]}
    out = io.StringIO()
    terminal = Console(file=out, width=40, force_terminal=True, color_system=None)
    print_table(evaluation_table(evaluation), terminal)
    lines = out.getvalue().splitlines()
    assert BOX_DRAWING.search(out.getvalue())  # rich's box on a terminal
    assert max(len(line) for line in lines) <= 40
    cells = "".join(line.split("│")[1].strip() for line in lines if line.count("│") == 4)
    assert long_path in cells  # folded onto several lines, not cut
