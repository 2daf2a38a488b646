"""The checkpoint layouts users bring: Lightning-style containers and prefixes, stray
tensors beside the model, fp8 tensors, near misses that need --model; and the commands
whose product is information print it on stdout."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_bad_input import Env, refused, run
from torch import nn


@pytest.fixture
def env(tmp_path) -> Env:
    torch.set_num_threads(1)
    return Env(tmp_path)


def merged_tensors(env: Env, *ckpts, out=None) -> dict[str, torch.Tensor]:
    out = out or env.root / "merged.safetensors"
    res = run("merge", *ckpts, "--data", env.data, "--gamma", "0.1", "-o", out, "--force", "-q")
    assert res.exit_code == 0, res.stderr
    return load_file(out)


def same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_lightning_checkpoints_merge_like_their_state_dicts(env):
    plain = merged_tensors(env, env.a, env.b)
    paths = []
    for k, sd in enumerate(env.sds):
        lightning = {
            "state_dict": {f"model.{name}": t for name, t in sd.items()}
            | {"model_ema.n_averaged": torch.tensor(3)},
            "epoch": 7,
            "global_step": 700,
            "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(3)}}}],
            "hyper_parameters": {"lr": 0.1},
        }
        paths.append(env.root / f"l{k}.ckpt")
        torch.save(lightning, paths[-1])
    res = run(
        "merge", *paths, "--data", env.data, "--gamma", "0.1", "--json", "-q", "--arch", "mlp"
    )
    assert res.exit_code == 0, res.stderr
    assert same(merged_tensors(env, *paths), plain)
    warnings = json.loads(res.stdout)["warnings"]
    assert f"{paths[0]}: read the tensors under 'model.' as the model" in warnings
    assert f"{paths[1]}: ignored 1 tensor(s) beside the mlp model: model_ema.n_averaged" in warnings


def test_a_step_counter_beside_the_model_is_a_warning(env):
    plain = merged_tensors(env, env.a, env.b)
    step = env.save("step.pt", {**env.sds[1], "step": torch.tensor(10)})
    res = run("merge", env.a, step, "--data", env.data, "--gamma", "0.1", "--json", "-q")
    assert res.exit_code == 0, res.stderr
    assert f"{step}: ignored 1 tensor(s) beside the mlp model: step" in res.stdout
    assert same(merged_tensors(env, env.a, step), plain)


def test_nothing_fits_lists_the_top_level_entries(env):
    odd = env.save(
        "odd.pt",
        {"optimizer": {"state": {0: {"m": torch.zeros(2)}}}, "net_state": env.sds[0], "epoch": 2},
    )
    line = refused(env.merge(ckpts=(odd, env.b)))
    assert line == (
        f"error: checkpoint {odd} holds no state dict of tensors at its top level or under "
        "state_dict, model_state_dict, model, module, net, network, weights, params; its "
        "top-level entries: optimizer (1 tensors), net_state (6 tensors), epoch (0 tensors)"
    )
    env.unchanged()


def test_near_misses_get_a_hint_toward_model(env):
    seq = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    bn = env.save("bn1d.pt", seq.state_dict())
    line = refused(env.merge(ckpts=(bn, bn)))
    assert line == (
        f"error: {bn}: no registered architecture fits this checkpoint; closest is 'mlp': "
        "tensor '1.running_mean' is not a Linear weight or bias; for a network of your own, "
        "pass --model pkg.module:factory (docs/custom-models.md)"
    )
    env.unchanged()


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_fp8_checkpoints_merge_in_float_and_keep_their_dtype(env, suffix):
    fp8 = torch.float8_e4m3fn
    paths = []
    for k, sd in enumerate(env.sds):
        low = {name: t.to(fp8) for name, t in sd.items()}
        paths.append(env.root / f"fp8_{k}{suffix}")
        save_file(low, paths[-1]) if suffix == ".safetensors" else torch.save(low, paths[-1])
    out = env.out_dir / f"fp8{suffix}"
    res = run("merge", *paths, "--data", env.data, "--gamma", "0.1", "-o", out, "-q")
    assert res.exit_code == 0, res.stderr
    merged = load_file(out) if suffix == ".safetensors" else torch.load(out, weights_only=True)
    assert {t.dtype for t in merged.values()} == {fp8}
    # the same merge of the fp8 values held in float32, rounded to fp8 once at the end
    wide = [
        env.save(f"wide{k}.pt", {n: t.to(fp8).float() for n, t in sd.items()})
        for k, sd in enumerate(env.sds)
    ]
    reference = merged_tensors(env, *wide)
    assert same(merged, {n: t.to(fp8) for n, t in reference.items()})


def test_wrong_shaped_data_with_model_is_one_line(env, tmp_path):
    from custom_nets import make_convnet

    ckpt = tmp_path / "conv.pt"
    torch.save(make_convnet().state_dict(), ckpt)
    rgb = env.npz("rgb.npz", x=np.zeros((4, 3, 8, 8), np.float32))
    res = run(
        "merge",
        ckpt,
        ckpt,
        "--model",
        "tests/custom_nets.py:make_convnet",
        "--data",
        rgb,
        "--method",
        "average",
        "-o",
        env.out,
    )
    line = refused(res)
    assert line.startswith("error: running ConvNet on samples of shape (3, 8, 8) failed")
    env.unchanged()


# --- information on stdout -----------------------------------------------------------


def test_archs_pipes_as_plain_lines():
    res = run("archs")
    assert res.exit_code == 0 and res.stderr == ""
    names = [line.split("\t")[0] for line in res.stdout.splitlines() if "\t" in line]
    assert {"mlp", "vgg", "resnet", "resnet_cifar"} <= set(names)
    assert [n for n in names if "resnet" in n] == ["resnet", "resnet_cifar"]
    assert "\x1b[" not in res.stdout


def test_eval_prints_on_stdout_and_checks_the_activation(env, tmp_path):
    torch.manual_seed(0)
    res = run("eval", env.a, "--data", env.data)
    assert res.exit_code == 0 and "accuracy" in res.stdout and str(env.a) in res.stdout
    assert "\x1b[" not in res.stdout
    digest = hashlib.sha256(env.a.read_bytes()).hexdigest()
    res = run("eval", env.a, "--data", env.data, "--activation", "tanh", "--json")
    doc = json.loads(res.stdout)
    assert doc["assumptions"] == [
        {"setting": "activation", "value": "tanh", "source": "--activation"}
    ]
    assert hashlib.sha256(env.a.read_bytes()).hexdigest() == digest


# --- Hugging Face-style folders and sharded checkpoints ----------------------------------


def hf_folder(root, name, sd, shards: int = 1):
    """A folder with config.json and model.safetensors, or ``shards`` shards and an index."""
    folder = root / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "mlp", "name": name}))
    if shards == 1:
        save_file(sd, folder / "model.safetensors")
        return folder
    names = sorted(sd)
    files = [f"model-{k + 1:05d}-of-{shards:05d}.safetensors" for k in range(shards)]
    weight_map = {n: files[i * shards // len(names)] for i, n in enumerate(names)}
    for file in files:
        save_file({n: sd[n] for n, f in weight_map.items() if f == file}, folder / file)
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def test_folders_and_shards_load_as_one_checkpoint(env):
    plain = merged_tensors(env, env.a, env.b)
    one = hf_folder(env.root, "hf0", env.sds[0])
    sharded = hf_folder(env.root, "hf1", env.sds[1], shards=3)
    for ckpts in ((one, sharded), (one, sharded / "model.safetensors.index.json")):
        assert same(merged_tensors(env, *ckpts), plain)
    empty = env.root / "empty_folder"
    empty.mkdir()
    line = refused(env.merge(ckpts=(env.a, empty)))
    assert line == (
        f"error: checkpoint folder {empty} holds none of model.safetensors, "
        "model.safetensors.index.json, pytorch_model.bin, pytorch_model.bin.index.json"
    )
    (sharded / "model-00002-of-00003.safetensors").unlink()
    line = refused(env.merge(ckpts=(env.a, sharded)))
    assert (
        line == f"error: checkpoint {sharded / 'model-00002-of-00003.safetensors'} does not exist"
    )
    env.unchanged()


def test_folder_output_with_config_and_shards(env, monkeypatch):
    from ccamerge.io import files as ccfiles

    plain = merged_tensors(env, env.a, env.b)
    inputs = (hf_folder(env.root, "hf0", env.sds[0]), hf_folder(env.root, "hf1", env.sds[1]))
    out = env.root / "merged_folder"
    res = run("merge", *inputs, "--data", env.data, "--gamma", "0.1", "-o", f"{out}/", "-q")
    assert res.exit_code == 0, res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert (out / "config.json").read_bytes() == (inputs[0] / "config.json").read_bytes()
    assert same(load_file(out / "model.safetensors"), plain)
    again = run("merge", *inputs, "--data", env.data, "--gamma", "0.1", "-o", f"{out}/", "-q")
    assert (
        refused(again)
        == f"error: output {out / 'model.safetensors'} exists; pass --force to overwrite it"
    )
    line = refused(run("merge", *inputs, "--data", env.data, "-o", f"{inputs[0]}/", "--force"))
    assert (
        line
        == f"error: output {inputs[0] / 'model.safetensors'} is also an input; choose another path"
    )
    # above the threshold: shards and an index, and the earlier single file is gone
    monkeypatch.setattr(ccfiles, "SHARD_BYTES", 300)
    res = run(
        "merge", *inputs, "--data", env.data, "--gamma", "0.1", "-o", f"{out}/", "-q", "--force"
    )
    assert res.exit_code == 0, res.stderr
    names = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" not in names and "model.safetensors.index.json" in names
    shards = [n for n in names if n.startswith("model-")]
    assert len(shards) > 1
    assert all((out / n).stat().st_size < 300 + 2000 for n in shards)  # tensors + header
    assert same(ccfiles.load_checkpoint(out), plain)
