"""No silent wrong answers: what a checkpoint does not record is said and checked,
non-finite values never reach a file or the JSON, too little data for BatchNorm is an
error, and inputs that look unnormalised are warned about."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from test_bad_input import Env, refused, run, snapshot
from torch import nn

from ccamerge.cli.common import print_json
from ccamerge.models.archs.vgg import vgg_config
from ccamerge.models.registry import get_architecture
from ccamerge.models.train import train_classifier

ccmerge = importlib.import_module(
    "ccamerge.runs.merge"
)  # the module (ccamerge.merge is the function)


def strict_loads(text: str):
    """json.loads that refuses NaN, Infinity and -Infinity, as strict parsers do."""

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture
def env(tmp_path) -> Env:
    torch.set_num_threads(1)
    return Env(tmp_path)


# --- item: the MLP activation is assumed, said and checked ----------------------------


@pytest.fixture(scope="module")
def tanh_mlps(tmp_path_factory, digits_mlps):
    """Two nn.Sequential MLPs with Tanh trained on the digits (saved as 0.*, 2.*)."""
    root = tmp_path_factory.mktemp("tanh")
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
        train_classifier(net, digits_mlps.train, epochs=20, seed=seed)
        paths.append(root / f"tanh{seed}.pt")
        torch.save(net.state_dict(), paths[-1])
    return paths


def _tanh_accuracy(path, test) -> float:
    """The accuracy of the Tanh network saved at ``path``, computed without ccamerge."""
    net = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    net.load_state_dict(torch.load(path, weights_only=True))
    with torch.no_grad():
        return float((net(test.x).argmax(1) == test.y).float().mean())


def _merge_json(*args):
    res = run("merge", *args, "--gamma", "0.1", "--json", "-q")
    assert res.exit_code == 0, res.stderr
    return strict_loads(res.stdout)


def test_assumed_activation_is_reported_and_checked(tanh_mlps, digits_mlps):
    data = ("--data", digits_mlps.calib_path, "--eval-data", digits_mlps.test_path)
    doc = _merge_json(*tanh_mlps, *data)
    assert doc["assumptions"] == [
        {
            "setting": "activation",
            "value": "relu",
            "source": "assumed (not recorded in checkpoints)",
        }
    ]
    flagged = [w for w in doc["warnings"] if "probably trained with" in w]
    assert len(flagged) == 1, doc["warnings"]
    assert "with activation relu (assumed)" in flagged[0]
    assert "pass --activation" in flagged[0]
    assumed_merge = doc["evaluation"]["merged"]["accuracy"]

    stated = _merge_json(*tanh_mlps, *data, "--activation", "tanh")
    assert stated["assumptions"][0] == {
        "setting": "activation",
        "value": "tanh",
        "source": "--activation",
    }
    assert stated["architecture"]["config"]["activation"] == "tanh"
    assert not [w for w in stated["warnings"] if "probably trained with" in w]
    # under their own activation the inputs and the merge score what they were trained to
    acc = _tanh_accuracy(tanh_mlps[0], digits_mlps.test)
    assert stated["evaluation"]["models"][0]["accuracy"] == pytest.approx(acc, abs=1e-6)
    assert stated["evaluation"]["merged"]["accuracy"] > assumed_merge


def test_relu_models_are_not_flagged(digits_mlps):
    """Control: ReLU networks checked under ReLU (near relatives score alike)."""
    doc = _merge_json(*digits_mlps.paths[:2], "--data", digits_mlps.calib_path)
    assert doc["assumptions"][0]["value"] == "relu"
    assert not [w for w in doc["warnings"] if "probably trained with" in w], doc["warnings"]


def test_bad_activation_values_are_refused(env, tmp_path):
    line = refused(env.merge("--activation", "swish"))
    assert line == (
        "error: --activation must be one of relu, tanh, gelu, sigmoid, silu, elu, "
        "leaky_relu, not 'swish'"
    )
    vgg = get_architecture("vgg").build(vgg_config((1,), (4,), num_classes=3, in_channels=1))
    torch.save(vgg.state_dict(), tmp_path / "vgg.pt")
    line = refused(env.merge("--activation", "tanh", ckpts=(tmp_path / "vgg.pt",) * 2))
    assert line == "error: --activation does not apply to vgg checkpoints"
    env.unchanged()


ASSUMED_RELU = {
    "setting": "activation",
    "value": "relu",
    "source": "assumed (not recorded in checkpoints)",
}


def _flagged(doc) -> list[str]:
    return [w for w in doc["warnings"] if "probably trained with tanh" in w]


def test_barrier_says_states_and_checks_the_activation(tanh_mlps, digits_mlps, tmp_path):
    args = ("barrier", *tanh_mlps, "--eval-data", digits_mlps.test_path, "--methods", "average")
    res = run(*args, "--steps", "3", "--json")
    assert res.exit_code == 0, res.stderr
    assert "activation relu (assumed (not recorded in checkpoints))" in res.stderr
    doc = strict_loads(res.stdout)
    assert doc["assumptions"] == [ASSUMED_RELU]
    assert len(_flagged(doc)) == 1 and _flagged(doc)[0].endswith("pass --activation tanh")

    res = run(*args, "--steps", "3", "--json", "--activation", "tanh")
    assert res.exit_code == 0, res.stderr
    stated = strict_loads(res.stdout)
    assert stated["assumptions"] == [{**ASSUMED_RELU, "value": "tanh", "source": "--activation"}]
    assert not _flagged(stated)
    for k, end in enumerate(stated["endpoints"]):
        assert end["accuracy"] == pytest.approx(
            _tanh_accuracy(tanh_mlps[k], digits_mlps.test), abs=1e-6
        )
        assert end["accuracy"] > doc["endpoints"][k]["accuracy"]

    csv_path = tmp_path / "curve.csv"
    line = refused(run(*args, "--activation", "swish", "--csv", csv_path))
    assert line.startswith("error: --activation must be one of relu, tanh,")
    assert not csv_path.exists()


def test_apply_uses_the_activation_the_transforms_were_computed_under(tanh_mlps, digits_mlps):
    data = ("--data", digits_mlps.calib_path, "--eval-data", digits_mlps.test_path)
    for stated in (True, False):
        transforms = tanh_mlps[0].parent / f"t-{stated}.safetensors"
        option = ("--activation", "tanh") if stated else ()
        merged = _merge_json(*tanh_mlps, *data, *option, "--save-transforms", transforms)
        res = run("apply", *tanh_mlps, "-t", transforms, *data, "--json", "-q")
        assert res.exit_code == 0, res.stderr
        doc = strict_loads(res.stdout)
        source = f"recorded in transforms {transforms}" + ("" if stated else " (assumed at merge)")
        value = "tanh" if stated else "relu"
        assert doc["assumptions"] == [{**ASSUMED_RELU, "value": value, "source": source}]
        assert doc["evaluation"] == merged["evaluation"]  # the same merge, the same scores
        flagged = _flagged(doc)
        assert len(flagged) == (0 if stated else 1), doc["warnings"]
        assert stated or flagged[0].endswith("merge again with --activation tanh")


def test_inspect_and_eval_say_the_activation(tanh_mlps, digits_mlps):
    res = run("inspect", tanh_mlps[0])
    assert res.exit_code == 0, res.stderr
    assert "activation relu (assumed (not recorded in checkpoints))" in res.stdout
    res = run("inspect", tanh_mlps[0], "--activation", "tanh", "--json")
    doc = strict_loads(res.stdout)
    assert doc["architecture"]["config"]["activation"] == "tanh"
    assert doc["assumptions"] == [{**ASSUMED_RELU, "value": "tanh", "source": "--activation"}]
    res = run("eval", tanh_mlps[0], "--data", digits_mlps.test_path)
    assert res.exit_code == 0, res.stderr
    assert "activation relu (assumed (not recorded in checkpoints))" in res.stderr


# --- item: non-finite option values, tensors and JSON ------------------------------------


@pytest.mark.parametrize(
    "args,message",
    [
        (("--gamma", "inf"), "error: --gamma expects a finite number or 'auto', got 'inf'"),
        (("--gamma", "nan"), "error: --gamma expects a finite number or 'auto', got 'nan'"),
        (
            ("--weights", "1,inf"),
            "error: --weights expects comma-separated finite numbers, got '1,inf'",
        ),
        (
            ("--method", "zipit", "--alpha", "nan"),
            "error: --alpha expects a finite number, got 'nan'",
        ),
        (
            ("--method", "zipit", "--param", "alpha=nan"),
            "error: --param alpha expects a finite number, got 'nan' "
            "(parameters of 'zipit': alpha, beta)",
        ),
    ],
)
def test_non_finite_options_are_refused(env, args, message):
    res = run("merge", env.a, env.b, "--data", env.data, "-o", env.out, *args)
    assert refused(res) == message
    env.unchanged()


def test_barrier_refuses_a_non_finite_gamma(env):
    res = run(
        "barrier",
        env.a,
        env.b,
        "--eval-data",
        env.data,
        "--data",
        env.data,
        "--methods",
        "cca",
        "--gamma",
        "inf",
        "--csv",
        env.out_dir / "b.csv",
    )
    assert refused(res) == "error: --gamma expects a finite number or 'auto', got 'inf'"
    env.unchanged()


def test_the_library_refuses_non_finite_method_parameters():
    from ccamerge.methods import make_method
    from ccamerge.runtime.errors import OptionError

    with pytest.raises(OptionError, match="method 'cca': gamma must be a finite number, got inf"):
        make_method("cca", gamma=float("inf"))


@pytest.mark.parametrize("refit", [True, False])
def test_a_non_finite_merged_tensor_is_never_written(env, monkeypatch, refit):
    merged = ccmerge.refit_or_fix_batchnorm

    def merged_with_nan(*args, **kwargs):
        state, model, done, refitted = merged(*args, **kwargs)
        assert (refitted is not None) == refit
        state["layers.1.weight"][0, 0] = float("nan")
        return state, model, done, refitted

    monkeypatch.setattr(ccmerge, "refit_or_fix_batchnorm", merged_with_nan)
    line = refused(env.merge("--refit" if refit else "--no-refit"))
    assert line == (
        f"error: output {env.out}: tensor layers.1.weight has NaN or Inf values; nothing was written"
    )
    env.unchanged()


def test_json_is_strict(capsys):
    print_json(
        {"a": float("nan"), "b": [1.5, float("inf")], "c": torch.tensor([float("-inf"), 2.0])}
    )
    assert strict_loads(capsys.readouterr().out) == {"a": None, "b": [1.5, None], "c": [None, 2.0]}


# --- item: too little data for BatchNorm ------------------------------------------------


def test_batchnorm_with_one_calibration_sample_is_an_error(env):
    config = vgg_config((1, 1), (4, 6), batch_norm=True, num_classes=3, in_channels=1)
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        paths.append(env.root / f"bn{seed}.safetensors")
        save_file(get_architecture("vgg").build(config).state_dict(), paths[-1])
    one = env.npz("one.npz", x=np.random.RandomState(0).randn(1, 1, 4, 4).astype(np.float32))
    line = refused(env.merge("--no-refit", ckpts=paths, data=one))
    assert line == (
        "error: BatchNorm statistics need batches of at least 2 calibration samples; got 1 "
        "sample(s) in batches of 1: give more calibration data (and a --batch-size of at least "
        "2), or keep the merged statistics with --no-reset-bn"
    )
    env.unchanged()
    line = refused(env.merge(ckpts=paths, data=one))  # the refit, the default
    assert line == (
        "error: the refit's BatchNorm statistics need at least 2 calibration samples; got 1: "
        "give more calibration data, or keep the merged statistics with --no-refit --no-reset-bn"
    )
    env.unchanged()
    # the said way on: the merged running statistics are kept, and the report says so
    res = env.merge("--no-refit", "--no-reset-bn", "--json", ckpts=paths, data=one)
    assert res.exit_code == 0, res.stderr
    assert strict_loads(res.stdout)["batchnorm"] == "kept merged running statistics (--no-reset-bn)"


# --- item: inputs that look unnormalised -----------------------------------------------


def test_unnormalised_inputs_are_warned_about(env):
    pixels = env.npz("pixels.npz", x=(np.abs(env.x) * 80).astype(np.uint8))
    big = env.npz("big.npz", x=env.x * 100)
    cases = {
        pixels: f"calibration data {pixels}: the inputs look unnormalised (integer dtype uint8, values up to ",
        big: f"calibration data {big}: the inputs look unnormalised (values up to ",
    }
    for data, start in cases.items():
        res = run("merge", env.a, env.b, "--data", data, "--gamma", "0.1", "--json", "-q")
        assert res.exit_code == 0, res.stderr
        flagged = [w for w in strict_loads(res.stdout)["warnings"] if "look unnormalised" in w]
        assert len(flagged) == 1 and flagged[0].startswith(start), flagged
    normal = run("merge", env.a, env.b, "--data", env.data, "--gamma", "0.1", "--json", "-q")
    assert not [w for w in strict_loads(normal.stdout)["warnings"] if "look unnormalised" in w]
    assert snapshot(env.out_dir) == env.before
