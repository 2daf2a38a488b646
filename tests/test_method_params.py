"""Merge methods as plug-ins: declared parameters, ``--param``, the alias flags, the
registry. The tests parametrized over ``list_methods()`` cover a new method for free."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from cli_run import refused, run
from safetensors.torch import load_file

import ccamerge
from ccamerge.cli.params import ALIASES, describe_default, method_params
from ccamerge.methods import (
    AlignContext,
    Alignment,
    MergeMethod,
    Param,
    list_methods,
    make_method,
    method_class,
    unregister_method,
)
from ccamerge.methods.base import identity_alignment
from ccamerge.models.registry import detect_architecture
from ccamerge.pipeline import candidate_methods
from ccamerge.runtime.errors import OptionError

DOCS = Path(__file__).resolve().parents[1] / "docs" / "methods.md"


# --- every registered method ------------------------------------------------------------


@pytest.mark.parametrize("name", list_methods())
def test_declarations_give_a_method_with_its_defaults(name):
    cls = method_class(name)
    method = make_method(name)
    assert method.params() == {p.name: p.default for p in cls.parameters}
    assert method == make_method(name, **method.params())
    for p in cls.parameters:
        # the command-line text of every default parses back to it
        assert p.parse(str(p.default).lower() if p.type is bool else str(p.default)) == p.default
        assert p.help and "\n" not in p.help


def _outside(p: Param):
    """Values the declaration refuses: out of range, the wrong type, not finite."""
    out = [] if p.type is str else ["text"]
    if p.low is not None:
        out.append(p.low - 1)
    if p.high is not None:
        out.append(p.high + 1)
    if p.choices:
        out.append("none-of-the-choices")
    if p.type in (float, int):
        out.append(float("inf"))
    if p.type is int:
        out.append(1.5)
    return out


@pytest.mark.parametrize(
    "name, param, value",
    [
        (m, p.name, v)
        for m in list_methods()
        for p in method_class(m).parameters
        for v in _outside(p)
    ],
)
def test_declared_checks_refuse_bad_values_in_one_line(name, param, value):
    with pytest.raises(OptionError) as e:
        make_method(name, **{param: value})
    assert str(e.value).startswith(f"method {name!r}: {param} must ") and "\n" not in str(e.value)


@pytest.mark.parametrize("name", list_methods())
def test_unknown_parameters_are_refused_naming_the_known_ones(name):
    known = ", ".join(p.name for p in method_class(name).parameters) or "none"
    with pytest.raises(OptionError) as e:
        make_method(name, bogus=1)
    assert str(e.value) == f"method {name!r} takes no parameter bogus (its parameters: {known})"


def _outputs(state_dict, x):
    model = detect_architecture(state_dict).build()
    model.load_state_dict(state_dict)
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize("name", list_methods())
def test_every_method_gives_back_a_model_merged_with_itself(digits_mlps, name):
    """Two copies of one model: every method's merge computes the model's function."""
    path = digits_mlps.paths[0]
    res = ccamerge.merge([path, path], method=name, data=str(digits_mlps.calib_path), refit=False)
    x = digits_mlps.test.x
    diff = (
        (_outputs(res.state_dict, x) - _outputs(digits_mlps.models[0].state_dict(), x)).abs().max()
    )
    assert diff < 1e-4, diff  # measured: 0.0 for the permutations and average, < 1e-5 for cca


@pytest.mark.parametrize("flag", sorted(ALIASES))
def test_each_alias_flag_sets_the_same_parameter_as_param(flag):
    key = ALIASES[flag]
    (name, p) = next(
        (m, p) for m in list_methods() for p in method_class(m).parameters if p.name == key
    )
    text = str(p.choices[-1] if p.choices else p.high if p.high is not None else p.default)
    by_alias = method_params([name], None, {flag: text})
    by_param = method_params([name], [f"{key}={text}"], {})
    assert by_alias == by_param == {key: p.parse(text)}


def test_the_docs_table_lists_every_declared_parameter():
    """docs/methods.md's parameter table is this table, generated from the registry."""
    rows = [
        "| method | parameter | type | default | valid values | `auto` tries | meaning |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in list_methods():
        for p in method_class(name).parameters:
            valid = " or ".join(p.choices) if p.choices else p.limits() or "any"
            tries = ", ".join(f"{c:g}" for c in p.candidates) if p.candidates else "–"
            rows.append(
                f"| `{name}` | `{p.name}` | {p.type.__name__} | {describe_default(p)} | {valid} "
                f"| {tries} | {p.help} |"
            )
    table = "\n".join(rows)
    assert table in DOCS.read_text(), f"docs/methods.md should hold:\n{table}"


# --- the command line --------------------------------------------------------------------


def test_param_sets_the_same_merge_as_the_alias_flag(digits_mlps, tmp_path):
    common = ["merge", *digits_mlps.paths[:2], "-d", digits_mlps.calib_path, "--no-refit", "-q"]
    run(*common, "--gamma", "0.3", "-o", tmp_path / "alias.safetensors")
    res = run(*common, "--param", "gamma=0.3", "-o", tmp_path / "param.safetensors")
    assert res.exit_code == 0, res.stderr
    alias = (tmp_path / "alias.safetensors").read_bytes()
    assert (tmp_path / "param.safetensors").read_bytes() == alias


def test_param_auto_searches_the_declared_candidates(digits_mlps):
    res = run("merge", *digits_mlps.paths[:2], "-d", digits_mlps.calib_path, "-p", "gamma=auto",
              "--json", "-q")  # fmt: skip
    assert res.exit_code == 0, res.stderr
    tried = [c["params"]["gamma"] for c in json.loads(res.stdout)["selection"]["candidates"]]
    assert tried == list(method_class("cca").parameters[0].candidates)


@pytest.mark.parametrize(
    "args, message",
    [
        (("--param", "gamma"), "error: --param expects KEY=VALUE, got 'gamma'"),
        (
            ("--param", "bogus=1"),
            "error: --param bogus: method 'cca' takes no parameter bogus "
            "(its parameters: gamma, ridge)",
        ),
        (
            ("--param", "gamma=big"),
            "error: --param gamma expects a finite number or 'auto', got 'big' "
            "(parameters of 'cca': gamma, ridge)",
        ),
        (
            ("--param", "gamma=-1"),
            "error: --param gamma must be >= 0, got -1.0 (parameters of 'cca': gamma, ridge)",
        ),
        (
            ("--param", "ridge=auto"),
            "error: --param ridge must be relative or absolute, got 'auto' "
            "(parameters of 'cca': gamma, ridge)",
        ),
        (
            ("-m", "zipit", "--param", "alpha=auto"),
            "error: --param alpha expects a finite number, got 'auto' "
            "(parameters of 'zipit': alpha, beta)",
        ),
        (
            ("-m", "weight-matching", "--max-iter", "2.5"),
            "error: --max-iter expects an integer, got '2.5'",
        ),
        (
            ("--gamma", "0.1", "--param", "gamma=0.2"),
            "error: parameter gamma given twice (--gamma and --param gamma)",
        ),
        (
            ("-m", "auto", "--param", "seed=1"),
            "error: --param seed: none of cca, permute, zipit takes seed "
            "(cca: gamma, ridge; permute: none; zipit: alpha, beta)",
        ),
        (
            ("-m", "permute", "--alpha", "0.5"),
            "error: --alpha: method 'permute' takes no parameter alpha (its parameters: none)",
        ),
    ],
)
def test_bad_params_are_one_line_errors(digits_mlps, tmp_path, args, message):
    out = tmp_path / "m.safetensors"
    res = run("merge", *digits_mlps.paths[:2], "-d", digits_mlps.calib_path, "-o", out, *args)
    assert refused(res) == message
    assert not out.exists()


def test_merge_help_lists_every_methods_parameters():
    res = run("merge", "--help")
    assert res.exit_code == 0
    text = re.sub(r"[\s│]+", " ", res.stdout)
    for name in list_methods():
        if method_class(name).parameters:
            names = ", ".join(p.name for p in method_class(name).parameters)
            assert f"{name}: {names}" in text
    assert "Alias of --param gamma=VALUE" in text


def test_barrier_takes_param(digits_mlps):
    res = run("barrier", *digits_mlps.paths[:2], "--data", digits_mlps.calib_path,
              "--eval-data", digits_mlps.test_path, "--methods", "average,zipit", "--steps", 3,
              "--param", "alpha=0.25", "--json", "-q")  # fmt: skip
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["methods"]["zipit"] == {"alpha": 0.25, "beta": 0.0}


# --- a new method: one class and its registration ----------------------------------------


class Scaled(MergeMethod):
    """A test method: every transform is ``scale`` times the identity (1: the average)."""

    name = "scaled-identity"
    needs_data = False
    description = "test: scaled identities"
    parameters = (
        Param("scale", float, 1.0, "factor of every transform", low=0.5, high=2.0),
        Param("note", str, "plain", "a label", choices=("plain", "fancy")),
    )

    def align(self, ctx: AlignContext) -> Alignment:
        alignment = identity_alignment(ctx.spec, ctx.n_models)
        for ga in alignment.groups.values():
            ga.M = [self.scale * M for M in ga.M]
            ga.U = [U / self.scale for U in ga.U]
        return alignment


@pytest.fixture
def scaled():
    ccamerge.register_method(Scaled)
    yield Scaled
    unregister_method(Scaled.name)
    assert Scaled.name not in list_methods()


def test_a_registered_method_runs_through_the_cli_with_its_parameter(digits_mlps, tmp_path, scaled):
    paths = digits_mlps.paths[:2]
    out, avg = tmp_path / "s.safetensors", tmp_path / "a.safetensors"
    res = run("merge", *paths, "-m", "scaled-identity", "--param", "scale=2", "-p", "note=fancy",
              "-o", out, "--json", "-q")  # fmt: skip
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["method"] == "scaled-identity"
    assert doc["params"] == {"scale": 2.0, "note": "fancy"}
    # every hidden unit doubled (and read back halved): with ReLU, the average's function,
    # exactly (scaling by powers of two rounds nothing)
    assert run("merge", *paths, "-m", "average", "-o", avg, "-q").exit_code == 0
    merged, average = load_file(out), load_file(avg)
    assert torch.equal(merged["layers.0.weight"], 2 * average["layers.0.weight"])
    x = digits_mlps.test.x
    assert torch.equal(_outputs(merged, x), _outputs(average, x))
    # its parameters are checked by its declarations, in one line
    res = run("merge", *paths, "-m", "scaled-identity", "--param", "scale=3")
    assert refused(res) == (
        "error: --param scale must lie in [0.5, 2], got 3.0 "
        "(parameters of 'scaled-identity': scale, note)"
    )
    # in --method auto only if it says so (auto_candidate)
    assert "scaled-identity" not in {m.name for m in candidate_methods("auto", {})}


def test_register_method_checks_the_declarations():
    class Broken(Scaled):
        name = "broken"
        parameters = (Param("scale", float, 5.0, "out of its own range", low=0.5, high=2.0),)

    with pytest.raises(ValueError, match="declared scale must lie in"):
        ccamerge.register_method(Broken)
    assert "broken" not in list_methods()

    class Twice(Scaled):
        name = "twice"
        parameters = (Scaled.parameters[0], Scaled.parameters[0])

    with pytest.raises(ValueError, match="declares a parameter twice"):
        ccamerge.register_method(Twice)
    with pytest.raises(ValueError, match="already registered"):
        ccamerge.register_method(method_class("cca"))
