"""Users' own architectures: ``--model file.py:factory`` through the CLI.

Two instances of tests/custom_nets.py's residual MLP are trained on the bundled
digits; merging them through ``--model`` (discovered feature groups) must beat
direct averaging. Spec files round-trip, and every way the factory or the
checkpoint can be wrong gives one line on stderr and exit code 1.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

from ccamerge.cli import app
from ccamerge.io.files import load_data
from ccamerge.maths.stats import collect_statistics
from ccamerge.models.archs.mlp import MLP
from ccamerge.models.custom import load_factory, load_spec, spec_from_dict
from ccamerge.models.discover import discover
from ccamerge.models.train import digits, train_classifier
from ccamerge.pipeline import evaluate
from ccamerge.runtime.errors import ArchitectureError, OptionError, SpecError

NETS = Path(__file__).parent / "custom_nets.py"
MAKE_NET = f"{NETS}:make_net"
ARGS = '{"width": 32, "hidden": 64}'

runner = CliRunner()


def run(*args: object):
    return runner.invoke(app, [str(a) for a in args])


@dataclass
class Trained:
    paths: list[Path]
    calib: Path
    test: Path
    root: Path


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Trained:
    """Two custom nets from seeds 0 and 1 (10 epochs each), calibration and test files."""
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("custom")
    make_net = load_factory(MAKE_NET)
    train, test = digits()
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = train_classifier(make_net(width=32, hidden=64), train, epochs=10, seed=seed)
        paths.append(root / f"net{seed}.pt")
        torch.save(model.state_dict(), paths[-1])
    np.savez(root / "calib.npz", x=train.x.numpy())
    np.savez(root / "test.npz", x=test.x.numpy(), y=test.y.numpy())
    return Trained(paths, root / "calib.npz", root / "test.npz", root)


def merge_json(t: Trained, *args: object) -> dict:
    res = run(
        "merge", *t.paths, "--model", MAKE_NET, "--model-args", ARGS,
        "--data", t.calib, "--eval-data", t.test, "--json", "--quiet", *args,
    )  # fmt: skip
    assert res.exit_code == 0, res.stderr
    return json.loads(res.stdout)


def test_cli_merge_of_a_custom_model_beats_direct_averaging(trained: Trained) -> None:
    out = trained.root / "merged.safetensors"
    cca = merge_json(trained, "-o", out, "--no-refit")  # the paper's merge
    average = merge_json(trained, "--method", "average", "--no-refit")
    assert cca["architecture"]["name"] == "custom"
    assert cca["architecture"]["config"] == {
        "factory": MAKE_NET,
        "model_args": {"width": 32, "hidden": 64},
        "input_shape": [64],
    }
    # the residual stream (embed, LayerNorm, both blocks' fc2, head input) and each block's fc1
    assert {g["name"]: g["size"] for g in cca["groups"]} == {
        "embed": 32,
        "blocks.0.fc1": 64,
        "blocks.1.fc1": 64,
    }
    acc = cca["evaluation"]["merged"]["accuracy"]
    avg = average["evaluation"]["merged"]["accuracy"]
    # measured: CCA 0.913, direct averaging 0.688 (models 0.966, 0.968; ensemble 0.974)
    assert acc >= avg + 0.18, (acc, avg)
    assert acc >= 0.88
    # the file loads strictly into the user's model and reproduces the reported accuracy
    model = load_factory(MAKE_NET)(width=32, hidden=64)
    model.load_state_dict(load_file(out), strict=True)
    score = evaluate(model.eval(), load_data(trained.test, require_labels=True))
    assert abs(score.accuracy - acc) < 1e-9


def test_a_custom_model_is_distilled_and_checked(trained: Trained) -> None:
    plain = merge_json(trained, "--method", "average", "--no-refit")
    distilled = merge_json(trained, "--method", "average", "--no-refit", "--distill", "2")
    before, after = plain["check"]["merged"], distilled["check"]["merged"]
    assert distilled["distill"]["epochs_run"] == 2
    assert after["kl"] < before["kl"], (before, after)  # closer to the ensemble


@pytest.mark.parametrize("output", ["tuple", "dict"])
def test_logits_in_a_tuple_or_dict_are_read(trained: Trained, output: str) -> None:
    """A forward returning its logits in a tuple or a dict merges, checks, distils and
    evaluates as the same network returning the tensor."""
    wrapped = ["--model", f"{NETS}:make_wrapped_net", "--model-args",
               json.dumps({"output": output, "width": 32, "hidden": 64})]  # fmt: skip
    options = ["--distill", "1", "--method", "average"]
    plain = merge_json(trained, *options)
    got = merge_json(trained, *options, *wrapped)
    assert got["evaluation"] == plain["evaluation"]
    assert got["check"] == plain["check"]
    assert [g["name"] for g in got["groups"]] == [g["name"] for g in plain["groups"]]


def test_a_forward_without_logits_is_a_one_line_error() -> None:
    from ccamerge.models.outputs import logits_of

    class Output:
        logits = None

    assert logits_of(type("HFOutput", (), {"logits": torch.ones(1)})()).shape == (1,)
    with pytest.raises(ArchitectureError, match="returns Output, with no logits in it"):
        logits_of(Output())


def test_spec_out_then_hand_edited_spec(trained: Trained) -> None:
    spec_path = trained.root / "spec.json"
    doc = merge_json(trained, "--method", "average", "--spec-out", spec_path)
    written = json.loads(spec_path.read_text())
    assert [g["name"] for g in written["groups"]] == [g["name"] for g in doc["groups"]]
    assert ["embed.weight", 0] in written["groups"][0]["members"]
    assert written["format"] == "ccamerge-spec" and written["version"] == 1
    # a hand edit: drop the stream group; the merge uses what the file says
    written["groups"] = [g for g in written["groups"] if g["name"] != "embed"]
    edited = trained.root / "edited.json"
    edited.write_text(json.dumps(written))
    doc = merge_json(trained, "--method", "average", "--spec", edited)
    assert [g["name"] for g in doc["groups"]] == ["blocks.0.fc1", "blocks.1.fc1"]
    # a wrong size is caught against the model, naming the tensor
    written["groups"][0]["size"] = 63
    edited.write_text(json.dumps(written))
    res = run("merge", *trained.paths, "--model", MAKE_NET, "--model-args", ARGS,
              "--data", trained.calib, "--spec", edited)  # fmt: skip
    assert res.exit_code == 1 and res.stdout == ""
    assert "blocks.0.fc1.weight has shape (64, 32), expected size 63 on axis 0" in res.stderr


def test_spec_out_for_a_registered_architecture(tmp_path: Path) -> None:
    """--spec-out/--spec work for built-in entries too (here the registry MLP)."""
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    for seed, p in ((0, a), (1, b)):
        torch.manual_seed(seed)
        torch.save(MLP([64, 16, 10]).state_dict(), p)
    data = tmp_path / "x.npz"
    np.savez(data, x=np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32))
    spec = tmp_path / "spec.json"
    res = run("merge", a, b, "--data", data, "-m", "average", "--spec-out", spec, "--quiet")
    assert res.exit_code == 0, res.stderr
    groups = load_spec(spec).groups
    assert [(g.name, g.collect_at, g.collect_on) for g in groups] == [
        ("hidden0", "layers.1", "input")
    ]
    res = run("merge", a, b, "--data", data, "-m", "average", "--spec", spec, "--quiet")
    assert res.exit_code == 0, res.stderr


def test_inspect_shows_discovered_groups_and_writes_a_spec(tmp_path: Path) -> None:
    ckpt = tmp_path / "conv.pt"
    torch.save(load_factory(f"{NETS}:make_convnet")(width=5).state_dict(), ckpt)
    model = ("--model", f"{NETS}:make_convnet", "--model-args", '{"width": 5}')
    res = run("inspect", ckpt, *model)
    assert res.exit_code == 1
    assert "cannot tell the input shape of ConvNet" in res.stderr
    spec_path = tmp_path / "spec.json"
    res = run("inspect", ckpt, *model, "--input-shape", "1,8,8", "--spec-out", spec_path, "--json")
    assert res.exit_code == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["architecture"]["config"]["input_shape"] == [1, 8, 8]
    (g,) = info["groups"]  # conv1, bn1, conv2, bn2 and fc's input: one residual stream
    assert g["name"] == "conv1" and g["size"] == 5 and set(g["norms"]) == {"bn1", "bn2"}
    assert {m["tensor"] for m in g["members"]} >= {"conv2.weight", "bn2.running_var", "fc.weight"}
    assert info["untransformed"] == [
        {
            "writers": ["fc"],
            "size": 10,
            "reasons": ["it reaches the model's output"],
            "expected": True,
        }
    ]
    written = json.loads(spec_path.read_text())
    assert written["untransformed"] == info["untransformed"]
    assert load_spec(spec_path).groups[0].members == tuple(
        (m["tensor"], m["axis"]) for m in g["members"]
    )
    res = run("inspect", ckpt, *model, "--input-shape", "1,8,8")  # the tables, on stdout
    assert res.exit_code == 0 and "untransformed units of fc" in res.stdout


def test_statistics_are_read_before_later_in_place_ops() -> None:
    """Users write ReLU(inplace=True) and ``out += x``: what a hook read must not change."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(6, 5)
            self.bn = nn.BatchNorm1d(5)
            self.act = nn.ReLU(inplace=True)
            self.fc2 = nn.Linear(5, 5)
            self.head = nn.Linear(5, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.act(self.bn(self.fc1(x)))
            h += self.fc2(h)
            return self.head(h)

    torch.manual_seed(0)
    model = Net().eval()
    spec = discover(model, (6,)).spec
    x = torch.randn(64, 6)
    stats = collect_statistics([model], spec, [x])
    with torch.no_grad():
        bn_out = model.bn(model.fc1(x))
    assert torch.allclose(stats.norms["bn"][0].mean, bn_out.mean(0).double(), atol=1e-6)
    assert (bn_out < 0).any()  # the in-place ReLU would have changed these


# --------------------------------------------------------------------------
# errors


@pytest.fixture(scope="module")
def untrained(tmp_path_factory) -> Trained:
    root = tmp_path_factory.mktemp("untrained")
    make_net = load_factory(MAKE_NET)
    paths = [root / "a.pt", root / "b.pt"]
    for seed, p in enumerate(paths):
        torch.manual_seed(seed)
        torch.save(make_net(width=32, hidden=64).state_dict(), p)
    np.savez(root / "calib.npz", x=np.random.default_rng(0).normal(size=(32, 64)).astype("f4"))
    return Trained(paths, root / "calib.npz", root / "calib.npz", root)


@pytest.mark.parametrize(
    "model,args,message",
    [
        ("no_such_pkg_xyz.nets:make_net", ARGS, "cannot import module 'no_such_pkg_xyz.nets'"),
        (f"{NETS}:make_nett", ARGS, "has no attribute 'make_nett' (callables there: "),
        ("tests/no_such_file.py:make_net", ARGS, "file tests/no_such_file.py does not exist"),
        ("make_net", ARGS, "expected 'package.module:factory' or 'path/to/file.py:factory'"),
        (f"{NETS}:not_a_module", "{}", "returned a dict, not a torch.nn.Module"),
        (f"{NETS}:broken", '{"width": 32}', "raised ValueError: width 32 is not supported"),
        (MAKE_NET, '{"widht": 32}', "unexpected keyword argument 'widht'"),
        (MAKE_NET, "[32]", "--model-args must be a JSON object"),
        (MAKE_NET, "{width: 32}", "--model-args is not valid JSON"),
        (MAKE_NET, '{"width": 32, "hidden": 64, "depth": 3}', "missing blocks.2.fc1.weight"),
        (
            MAKE_NET,
            '{"width": 32, "hidden": 40}',
            "blocks.0.fc1.weight has shape (64, 32), the model's is (40, 32)",
        ),
    ],
)
def test_factory_and_checkpoint_errors_are_one_line(
    untrained: Trained, model: str, args: str, message: str
) -> None:
    res = run("merge", *untrained.paths, "--model", model, "--model-args", args,
              "--data", untrained.calib)  # fmt: skip
    assert res.exit_code == 1, res.output
    assert res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert message in lines[0], lines[0]


def test_checkpoint_of_another_network_names_its_keys(untrained: Trained, tmp_path: Path) -> None:
    other = tmp_path / "mlp.pt"
    torch.save(MLP([64, 16, 10]).state_dict(), other)
    res = run("merge", other, other, "--model", MAKE_NET, "--data", untrained.calib)
    assert res.exit_code == 1
    assert f"{other} does not fit {MAKE_NET}(): missing embed.weight" in res.stderr
    assert "unexpected layers.0.weight, layers.0.bias" in res.stderr


def test_model_and_arch_exclude_each_other(untrained: Trained) -> None:
    res = run("merge", *untrained.paths, "--model", MAKE_NET, "--arch", "mlp",
              "--data", untrained.calib)  # fmt: skip
    assert res.exit_code == 1 and "--model and --arch exclude each other" in res.stderr


def test_dotted_factory_is_imported_from_the_current_directory(tmp_path, monkeypatch) -> None:
    pkg = tmp_path / "usernets"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(
        "from torch import nn\n\ndef tiny(width=3):\n    return nn.Linear(4, width)\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    factory = load_factory("usernets.nets:tiny")
    assert factory(width=5).out_features == 5
    with pytest.raises(OptionError, match="importing usernets.broken failed"):
        (pkg / "broken.py").write_text("raise RuntimeError('boom')\n")
        load_factory("usernets.broken:tiny")


def test_spec_documents_are_checked() -> None:
    good = {
        "format": "ccamerge-spec",
        "version": 1,
        "groups": [
            {"name": "h", "size": 4, "members": [["a.weight", 0], ["b.weight", 1]],
             "collect_at": "b", "collect_on": "input"}
        ],
    }  # fmt: skip
    assert spec_from_dict(good).group("h").members == (("a.weight", 0), ("b.weight", 1))
    bad_cases = [
        ({"format": "other"}, "not a ccamerge spec"),
        ({**good, "version": 2}, "unsupported spec version 2"),
        ({**good, "groups": [{**good["groups"][0], "colect_at": "b"}]}, "unknown key(s) colect_at"),
        ({**good, "groups": [{**good["groups"][0], "members": [["a.weight"]]}]}, "[tensor, axis]"),
        ({**good, "groups": [{**good["groups"][0], "collect_on": "middle"}]}, "'collect_on' must"),
        ({**good, "groups": [{**good["groups"][0], "members": [["a.weight", -1]]}]}, "axis -1"),
        ({**good, "groups": good["groups"] * 2}, "duplicate group name 'h'"),
        ({**good, "copies": [{"name": "q", "group": "h"}]}, "head copies 0 must be"),
        (
            {**good, "copies": [{"name": "q", "group": "x", "copies": 2, "members": []}]},
            "no group 'x' to copy",
        ),
        ({**good, "folds": [{"norm": "n", "readers": "a"}]}, "fold 0 must be"),
        ({**good, "groups": [{**good["groups"][0], "orthogonal": 1}]}, "'orthogonal' must be"),
        ({**good, "concats": [{"name": "c", "parts": 3, "members": []}]}, "concatenation 0"),
    ]
    for doc, message in bad_cases:
        with pytest.raises(SpecError) as e:
            spec_from_dict(doc)
        assert message in str(e.value), (message, str(e.value))
