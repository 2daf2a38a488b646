"""Hostile files, bad input, numerical trouble: `ccamerge merge` refuses with one line on
stderr and a non-zero exit code, runs no code from a checkpoint, and writes nothing (an
existing output stays byte for byte as it was; no temporary file is left behind)."""

from __future__ import annotations

import errno
import importlib
import json
import os
import pickle
import random
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_run import refused, run
from safetensors.torch import load_file, save_file

from ccamerge.cli.common import set_debug
from ccamerge.io import files as ccio
from ccamerge.maths import stats as ccstats
from ccamerge.models.archs.mlp import MLP
from ccamerge.models.registry import get_architecture, list_architectures
from ccamerge.runtime.errors import CcaMergeError, CheckpointError

SIZES = [8, 16, 12, 3]  # tiny: every merge below takes milliseconds


class Payload:
    """Unpickling this creates ``marker``: the stand-in for code hidden in a checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


class Env:
    """Two tiny MLP checkpoints (.pt and .safetensors), calibration and eval data, and an
    output folder that holds one existing file (which must never change on a failure)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sds = []
        for seed in (0, 1):
            torch.manual_seed(seed)
            sd = MLP(SIZES).state_dict()
            torch.save(sd, root / f"m{seed}.pt")
            save_file(sd, root / f"m{seed}.safetensors")
            self.sds.append(sd)
        self.a, self.b = root / "m0.pt", root / "m1.pt"
        rng = np.random.RandomState(0)
        self.x = rng.randn(200, SIZES[0]).astype(np.float32)
        self.y = rng.randint(0, SIZES[-1], 200)
        self.data = root / "calib.npz"
        np.savez(self.data, x=self.x, y=self.y)
        self.out_dir = root / "out"
        self.out_dir.mkdir()
        self.existing = self.out_dir / "existing.safetensors"
        self.existing.write_bytes(b"an earlier merge, not to be touched")
        self.out = self.out_dir / "merged.safetensors"
        self.before = snapshot(self.out_dir)

    def save(self, name: str, sd) -> Path:
        path = self.root / name
        torch.save(sd, path)
        return path

    def npz(self, name: str, **arrays) -> Path:
        path = self.root / name
        np.savez(path, **arrays)
        return path

    def merge(self, *args, ckpts=None, data=None, out=None, env=None):
        ckpts = ckpts or (self.a, self.b)
        data = self.data if data is None else data
        out = self.out if out is None else out
        return run("merge", *ckpts, "--data", data, "-o", out, "--gamma", "0.1", *args, env=env)

    def unchanged(self) -> None:
        """Nothing appeared in the output folder, nothing changed, no temp file left."""
        assert snapshot(self.out_dir) == self.before


@pytest.fixture
def env(tmp_path) -> Env:
    torch.set_num_threads(1)
    return Env(tmp_path)


def test_the_setup_merges(env):
    """Control: the good inputs do merge, so every refusal below is the bad input's doing."""
    res = env.merge()
    assert res.exit_code == 0, res.stderr
    assert set(load_file(env.out)) == set(env.sds[0])


# --- hostile files -------------------------------------------------------------------


PICKLES = {  # how each file format's refusal reads
    "zip": "it would import io.open",
    "legacy": "it would import io.open",
    "plain_pickle2": "it would import io.open",
    "plain_pickle4": "the safe (weights-only) unpickler refused it",
}


@pytest.mark.parametrize("fmt", sorted(PICKLES))
def test_pickle_that_runs_code_is_refused(env, fmt):
    marker, control_marker = env.root / "PWNED", env.root / "control_marker"

    def write(path: Path, marker: Path) -> None:
        obj = {**env.sds[0], "layers.0.weight": Payload(marker)}
        if fmt in ("zip", "legacy"):
            torch.save(obj, path, _use_new_zipfile_serialization=fmt == "zip")
        else:
            with open(path, "wb") as f:
                pickle.dump(obj, f, protocol=int(fmt[-1]))

    # the payload is live: a plain unpickling would create its marker
    control = env.root / "control.pt"
    write(control, control_marker)
    if fmt.startswith("plain"):
        with open(control, "rb") as f:
            pickle.load(f)
    else:
        torch.load(control, weights_only=False)
    assert control_marker.exists()

    evil = env.root / "evil.pt"
    write(evil, marker)
    line = refused(env.merge(ckpts=(env.a, evil)))
    assert "refused" in line and PICKLES[fmt] in line and "evil.pt" in line, line
    if "import" in PICKLES[fmt]:
        assert "holds Python objects other than tensors" in line and "refused to unpickle" in line
    assert not marker.exists()
    env.unchanged()


def test_pickle_in_data_files_is_refused(env):
    marker = env.root / "PWNED"
    torch.save({"x": Payload(marker)}, env.root / "evil_data.pt")
    np.save(env.root / "evil.npy", np.array([Payload(marker)], dtype=object), allow_pickle=True)
    np.savez(env.root / "evil.npz", x=np.array([Payload(marker)], dtype=object))
    expected = {
        "evil_data.pt": "refused to unpickle",
        "evil.npy": "not a valid .npy",
        "evil.npz": "not a valid .npz",
    }
    for name, text in expected.items():
        line = refused(env.merge(data=env.root / name))
        assert text in line, line
    assert not marker.exists()
    env.unchanged()


def _corrupt(env: Env, kind: str) -> Path:
    root = env.root
    if kind == "zip_truncated":
        raw = env.a.read_bytes()
        (root / "bad.pt").write_bytes(raw[: len(raw) // 2])
    elif kind == "legacy_truncated":
        torch.save(env.sds[1], root / "legacy.pt", _use_new_zipfile_serialization=False)
        raw = (root / "legacy.pt").read_bytes()
        (root / "bad.pt").write_bytes(raw[: len(raw) // 2])
    elif kind == "garbage":
        (root / "bad.pt").write_bytes(random.Random(0).randbytes(4096))
    elif kind == "safetensors_truncated":
        raw = (root / "m1.safetensors").read_bytes()
        (root / "bad.safetensors").write_bytes(raw[: len(raw) // 2])
    elif kind == "safetensors_header":
        raw = bytearray((root / "m1.safetensors").read_bytes())
        raw[12:20] = b"\xff" * 8  # inside the JSON header
        (root / "bad.safetensors").write_bytes(bytes(raw))
    elif kind == "safetensors_header_length":
        raw = bytearray((root / "m1.safetensors").read_bytes())
        raw[:8] = (1 << 40).to_bytes(8, "little")  # claims a 1 TB header
        (root / "bad.safetensors").write_bytes(bytes(raw))
    elif kind == "empty":
        (root / "bad.pt").write_bytes(b"")
    elif kind == "directory":
        (root / "bad.pt").mkdir()
    elif kind == "missing":
        pass
    elif kind == "not_a_state_dict":
        torch.save([1, 2, 3], root / "bad.pt")
    elif kind == "unknown_suffix":
        (root / "bad.txt").write_text("hello")
        return root / "bad.txt"
    return root / ("bad.safetensors" if kind.startswith("safetensors") else "bad.pt")


CORRUPT = {
    "zip_truncated": "cannot be read as a torch file",
    "legacy_truncated": "cannot be read as a torch file",
    "garbage": "cannot be read as a torch file: the safe (weights-only) unpickler refused it",
    "safetensors_truncated": "is not a valid safetensors file",
    "safetensors_header": "is not a valid safetensors file",
    "safetensors_header_length": "is not a valid safetensors file",
    "empty": "is empty",
    "directory": "holds none of model.safetensors",
    "missing": "does not exist",
    "not_a_state_dict": "holds no state dict of tensors",
    "unknown_suffix": "unknown file type",
}


@pytest.mark.parametrize("kind", sorted(CORRUPT))
def test_unreadable_checkpoint(env, kind):
    bad = _corrupt(env, kind)
    line = refused(env.merge(ckpts=(env.a, bad)))
    assert CORRUPT[kind] in line and bad.name in line, line
    env.unchanged()


def test_legacy_format_checkpoint_is_read(env):
    torch.save(env.sds[1], env.root / "legacy.pt", _use_new_zipfile_serialization=False)
    res = env.merge(ckpts=(env.a, env.root / "legacy.pt"))
    assert res.exit_code == 0, res.stderr


def test_unreadable_file_os_access(env, monkeypatch):
    real = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode, **kw: False if Path(p) == env.b else real(p, mode, **kw)
    )
    line = refused(env.merge())
    assert "m1.pt is not readable (permission denied)" in line
    env.unchanged()


def test_unreadable_file_open_fails(env, monkeypatch):
    """os.access can say yes (root, ACLs, network file systems) and open still fail."""
    import builtins

    real = builtins.open

    def fake_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and Path(file) == env.b:
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    line = refused(env.merge())
    assert "m1.pt is not readable (permission denied)" in line
    env.unchanged()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_real_permissions(env):
    env.b.chmod(0)
    try:
        line = refused(env.merge())
    finally:
        env.b.chmod(0o644)
    assert "not readable" in line
    env.unchanged()


def test_corrupted_files_never_escape_as_other_errors(env):
    """Seeded random damage (byte flips, truncation, zeroed runs) to every readable format:
    the readers raise CcaMergeError and nothing else."""
    torch.save(env.sds[0], env.root / "legacy.pt", _use_new_zipfile_serialization=False)
    np.save(env.root / "calib.npy", env.x)
    torch.save({"x": torch.from_numpy(env.x)}, env.root / "calib.pt")
    sources = {
        "m0.pt": ccio.load_checkpoint,
        "legacy.pt": ccio.load_checkpoint,
        "m0.safetensors": ccio.load_checkpoint,
        "calib.npz": ccio.load_data,
        "calib.npy": ccio.load_data,
        "calib.pt": ccio.load_data,
    }
    rng = random.Random(0)
    for name, reader in sources.items():
        raw = (env.root / name).read_bytes()
        target = env.root / f"fuzz{Path(name).suffix}"
        for _ in range(40):
            b = bytearray(raw)
            how = rng.choice(["flip", "truncate", "zero"])
            if how == "flip":
                for _ in range(rng.randint(1, 8)):
                    b[rng.randrange(len(b))] = rng.randrange(256)
            elif how == "truncate":
                b = b[: rng.randrange(1, len(b))]
            else:
                i = rng.randrange(len(b))
                b[i : i + 64] = bytes(len(b[i : i + 64]))
            target.write_bytes(bytes(b))
            try:
                reader(target)
            except CcaMergeError:
                pass


# --- checkpoints that do not fit each other ----------------------------------------


def _mismatch(env: Env, kind: str) -> Path:
    sd = {k: v.clone() for k, v in env.sds[1].items()}
    if kind == "other_architecture":
        vgg = get_architecture("vgg")
        return env.save("other.pt", vgg.build(vgg.example_config()).state_dict())
    if kind == "other_width":
        torch.manual_seed(3)
        return env.save("other.pt", MLP([8, 20, 12, 3]).state_dict())
    if kind == "missing_tensor":
        del sd["layers.2.bias"]
    elif kind == "extra_tensor":
        sd["layers.3.scale"] = torch.ones(3)
    elif kind == "integer_weights":
        sd["layers.0.weight"] = (sd["layers.0.weight"] * 100).to(torch.int64)
    elif kind == "nan_weight":
        sd["layers.1.weight"][0, 0] = float("nan")
    elif kind == "inf_weight":
        sd["layers.1.bias"][3] = float("inf")
    return env.save("other.pt", sd)


MISMATCH = {
    "other_architecture": "other.pt is a vgg checkpoint but",
    "other_width": "layers.0.weight has shape (20, 8), expected (16, 8)",
    "missing_tensor": "missing layers.2.bias",
    "extra_tensor": "unexpected layers.3.scale",
    "integer_weights": "layers.0.weight has dtype torch.int64, expected a floating-point",
    "nan_weight": "tensor layers.1.weight has NaN or Inf values",
    "inf_weight": "tensor layers.1.bias has NaN or Inf values",
}


@pytest.mark.parametrize("kind", sorted(MISMATCH))
@pytest.mark.parametrize("first", [False, True], ids=["second", "first"])
def test_checkpoints_that_do_not_fit(env, kind, first):
    if kind == "other_architecture" and "vgg" not in list_architectures():
        pytest.skip("no vgg entry registered")
    bad = _mismatch(env, kind)
    ckpts = (bad, env.a) if first else (env.a, bad)
    line = refused(env.merge(ckpts=ckpts))
    if kind in ("missing_tensor", "extra_tensor") and first:
        # the reference is the odd one: detection on it already fails
        other = {
            "missing_tensor": "some Linear layers have a bias and others not",
            "extra_tensor": "tensor 'layers.3.scale' is not a Linear weight or bias",
        }
        assert "no registered architecture fits" in line and other[kind] in line, line
    elif kind == "other_architecture" and first:
        assert "m0.pt is a mlp checkpoint but" in line and "other.pt is a vgg" in line, line
    elif kind == "other_width" and first:
        assert "layers.0.weight has shape (16, 8), expected (20, 8)" in line, line
    else:
        assert MISMATCH[kind] in line, line
    env.unchanged()


# --- calibration and evaluation data -------------------------------------------------


def test_data_that_does_not_fit_the_mlp(env):
    x = env.x.copy()
    x[5, 3] = np.nan
    cases = {
        env.npz("features.npz", x=env.x[:, :7]): "samples of shape (7,) (7 values) do not fit mlp",
        env.npz("nan.npz", x=x): "inputs contain NaN or Inf",
        env.npz("several.npz", a=env.x, b=env.x): "several arrays (a, b) and none is named 'x'",
        env.npz("text.npz", x=np.array([["a"] * 8] * 4)): "inputs have unsupported dtype",
        env.npz("one_sample_axis.npz", x=env.x[0]): "expected (samples, ...)",
    }
    for path, text in cases.items():
        line = refused(env.merge(data=path))
        assert text in line and path.name in line, line
    env.unchanged()


def test_eval_labels_that_do_not_fit(env, monkeypatch):
    def no_statistics(*args, **kwargs):  # labels are checked before minutes of work
        raise AssertionError("the statistics pass ran before the labels were checked")

    monkeypatch.setattr(
        importlib.import_module("ccamerge.pipeline.statistics"), "collect_statistics", no_statistics
    )
    cases = {
        env.npz("short.npz", x=env.x, y=env.y[:150]): "(150,) labels for 200 samples",
        env.npz("range.npz", x=env.x, y=env.y + 5): "labels range over [5, 7] but the model has 3",
        env.npz("negative.npz", x=env.x, y=env.y - 1): "labels range over [-1, 1]",
        env.npz("unlabelled.npz", x=env.x): "has no labels 'y'",
        env.npz("fractional.npz", x=env.x, y=env.y + 0.5): "labels 'y' are not integers",
    }
    for path, text in cases.items():
        line = refused(env.merge("--eval-data", path))
        assert text in line, line
    env.unchanged()


@pytest.mark.parametrize("arch", ["vgg", "resnet_cifar"])
def test_images_that_do_not_fit_a_conv_net(env, arch):
    if arch not in list_architectures():
        pytest.skip(f"no {arch} entry registered")
    entry = get_architecture(arch)
    config = entry.example_config()
    ckpts = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        ckpts.append(env.save(f"{arch}{seed}.pt", entry.build(config).state_dict()))
    shape = entry.input_shape(config) or entry.example_input_shape(config)
    c, h, w = shape
    rng = np.random.RandomState(0)
    cases = {
        "channels": (np.float32(rng.randn(8, c + 1, h, w)), f"({c + 1}, {h}, {w})"),
        "flat": (np.float32(rng.randn(8, c * h * w)), f"({c * h * w},)"),
    }
    if entry.input_shape(config) is not None:  # a fixed spatial size (VGG's classifier)
        cases["spatial"] = (np.float32(rng.randn(8, c, h + 3, w + 3)), f"({c}, {h + 3}, {w + 3})")
    for name, (x, shape_text) in cases.items():
        path = env.npz(f"{name}.npz", x=x)
        line = refused(env.merge(ckpts=ckpts, data=path))
        assert f"samples of shape {shape_text} do not fit {arch}" in line, line
    env.unchanged()


STDIN_TWICE = {  # a run that names standard input for two inputs, and the two it names
    "data and eval data": (
        lambda env: env.merge("--eval-data", "-", data="-"),
        "--data and --eval-data",
    ),
    "a checkpoint and data": (
        lambda env: env.merge(ckpts=("-", env.b), data="-"),
        "checkpoint 0 and --data",
    ),
    "two checkpoints": (
        lambda env: env.merge(ckpts=(env.a, "-", "-")),
        "checkpoint 1 and checkpoint 2",
    ),
    "apply": (
        lambda env: run("apply", env.a, env.b, "-t", "-", "--data", "-", "-o", env.out),
        "--transforms and --data",
    ),
    "barrier": (
        lambda env: run("barrier", env.a, "-", "--eval-data", "-", "--data", env.data),
        "checkpoint B and --eval-data",
    ),
    "eval": (lambda env: run("eval", env.a, "-", "--data", "-"), "checkpoint 1 and --data"),
}


@pytest.mark.parametrize("case", sorted(STDIN_TWICE))
def test_standard_input_named_twice_is_refused_before_reading(env, monkeypatch, case):
    def no_reading(*args, **kwargs):
        raise AssertionError("standard input was read")

    monkeypatch.setattr(ccio, "_load_stdin_data", no_reading)
    command, named = STDIN_TWICE[case]
    line = refused(command(env))
    assert line == f"error: - (standard input) can be read only once, but it is given for {named}"
    env.unchanged()


def test_standard_input_named_three_times_lists_all(env):
    line = refused(env.merge("--eval-data", "-", ckpts=("-", env.b), data="-"))
    assert line.endswith("it is given for checkpoint 0, --data and --eval-data")


# --- numerical trouble ---------------------------------------------------------------


def _finite_output(path: Path) -> None:
    sd = load_file(path)
    assert sd and all(torch.isfinite(t).all() for t in sd.values())


def test_too_few_samples_warns_and_stays_finite(env):
    few = env.npz("few.npz", x=env.x[:5])
    for gamma in ("0.1", "0"):
        out = env.root / f"few_{gamma}.safetensors"
        res = run("merge", env.a, env.b, "-d", few, "-o", out, "--gamma", gamma, "--json")
        assert res.exit_code == 0, res.stderr
        _finite_output(out)
        warnings = json.loads(res.stdout)["warnings"]
        assert any("group hidden0: 5 activation rows for 16 units" in w for w in warnings)
        assert any("Use at least 160 rows" in w for w in warnings)
        assert any("Use at least 120 rows" in w for w in warnings)  # hidden1 has 12 units
        assert "Use at least 160 rows" in " ".join(res.stderr.split())  # and on stderr
    enough = run("merge", env.a, env.b, "-d", env.data, "--gamma", "0.1", "--json")
    assert enough.exit_code == 0
    assert not [w for w in json.loads(enough.stdout)["warnings"] if "activation rows" in w]


@pytest.mark.parametrize("gamma,ridge", [("0.1", "relative"), ("0", "relative"), ("0", "absolute")])
def test_dead_units_stay_finite(env, gamma, ridge):
    sd = {k: v.clone() for k, v in env.sds[1].items()}
    sd["layers.0.bias"].fill_(-1e4)  # ReLU outputs 0 on every sample: hidden0 is all dead
    dead = env.save("dead.pt", sd)
    for ckpts in ((env.a, dead), (dead, dead)):
        res = run(
            "merge",
            *ckpts,
            "-d",
            env.data,
            "-o",
            env.out,
            "--force",
            "--json",
            "--gamma",
            gamma,
            "--ridge",
            ridge,
        )
        assert res.exit_code == 0, res.stderr
        _finite_output(env.out)
        doc = json.loads(res.stdout)
        for g in doc["groups"]:
            for v in (g["mean_correlation"], g["min_correlation"], g["condition_number"]):
                assert v is None or np.isfinite(v)
        assert any("16 of 16 units of model 1 are constant" in w for w in doc["warnings"])


def test_activation_overflow_names_the_layer(env):
    sd = {k: v.clone() for k, v in env.sds[1].items()}
    sd["layers.0.weight"] *= 1e30  # finite weights, but the second layer's input is inf
    sd["layers.1.weight"] *= 1e30
    huge = env.save("huge.pt", sd)
    line = refused(env.merge(ckpts=(env.a, huge)))
    assert "non-finite activations at layers.2 (input of group hidden1)" in line, line
    env.unchanged()


# --- the output file -----------------------------------------------------------------


def test_output_paths_that_are_refused(env):
    (env.root / "a_file").write_text("x")
    cases = {
        env.root / "nowhere" / "m.safetensors": "does not exist",
        env.root / "a_file" / "m.safetensors": "is not a directory",
        env.out_dir: "must end in one of .safetensors, .pt, .pth, .bin, /",
        env.out_dir / "m.npz": "must end in one of .safetensors, .pt, .pth, .bin, /",
        env.existing: "exists; pass --force to overwrite it",
    }
    for out, text in cases.items():
        line = refused(env.merge(out=out))
        assert text in line, line
    assert not (env.root / "nowhere").exists()
    env.unchanged()


def test_output_that_is_an_input_is_refused(env):
    inputs = (env.root / "m0.safetensors", env.root / "m1.safetensors")
    before = [p.read_bytes() for p in inputs]
    alias = env.out_dir / "alias.safetensors"
    os.link(inputs[1], alias)  # a hard link is the same file under another name
    symlink = env.out_dir / "symlink.safetensors"
    symlink.symlink_to(inputs[1])
    env.before = snapshot(env.out_dir)
    for out in (inputs[1], alias, symlink):
        line = refused(env.merge("--force", ckpts=inputs, out=out))
        assert "is also an input" in line, line
    assert [p.read_bytes() for p in inputs] == before
    env.unchanged()


@pytest.mark.parametrize("where", ["fsync", "replace"])
@pytest.mark.parametrize("exc", ["disk_full", "interrupt"])
def test_failed_write_leaves_nothing_behind(env, monkeypatch, where, exc):
    def fail(*args, **kwargs):
        if exc == "disk_full":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        raise KeyboardInterrupt

    monkeypatch.setattr(ccio.os, where, fail)
    for out in (env.out, env.existing):  # a new file, and one to overwrite with --force
        line = refused(env.merge("--force", out=out), 1 if exc == "disk_full" else 130)
        if exc == "disk_full":
            assert line.endswith("No space left on device") and out.name in line, line
        else:
            assert "interrupted; nothing was written" in line
        env.unchanged()


def test_interrupt_during_statistics(env, monkeypatch):
    calls = {"n": 0}
    real = ccstats._check_finite

    def interrupt_on_second_batch(Z, where):
        calls["n"] += 1
        if calls["n"] > 2:  # two groups per batch: the second batch is interrupted
            raise KeyboardInterrupt
        return real(Z, where)

    monkeypatch.setattr(ccstats, "_check_finite", interrupt_on_second_batch)
    line = refused(env.merge("--batch-size", "50"), 130)
    assert calls["n"] == 3
    assert line == "error: interrupted; nothing was written"
    env.unchanged()


def test_output_file_mode_follows_umask(env):
    old = os.umask(0o027)
    try:
        res = env.merge()
    finally:
        os.umask(old)
    assert res.exit_code == 0, res.stderr
    assert env.out.stat().st_mode & 0o777 == 0o640


def test_new_file_appearing_during_the_merge_is_not_clobbered(env, monkeypatch):
    """The output is checked again right before writing (a merge takes minutes)."""
    ccmerge = importlib.import_module("ccamerge.runs.merge")  # ccamerge.merge is the function
    real_check = ccmerge.check_outputs
    calls = {"n": 0}

    def check(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # someone else wrote the file while the merge was computed
            env.out.write_bytes(b"theirs")
        return real_check(*args, **kwargs)

    monkeypatch.setattr(ccmerge, "check_outputs", check)  # before the work and before writing
    line = refused(env.merge())
    assert calls["n"] == 2 and "exists; pass --force" in line
    assert env.out.read_bytes() == b"theirs"


# --- --debug shows the traceback -----------------------------------------------------


def test_debug_shows_the_traceback(env):
    missing = env.root / "missing.pt"
    args = ["merge", env.a, missing, "-d", env.data, "-o", env.out]
    # a real process: Python prints the traceback of the library's error
    res = subprocess.run(
        [sys.executable, "-c", "from ccamerge.cli import main; main()", "--debug", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if k != "CCAMERGE_DEBUG"},
    )
    assert res.returncode == 1, res.stderr
    assert "Traceback (most recent call last)" in res.stderr
    assert (
        f"ccamerge.runtime.errors.CheckpointError: checkpoint {missing} does not exist"
        in res.stderr
    )
    # CCAMERGE_DEBUG=1 does the same: the error escapes instead of becoming one line
    try:
        res = run(*args, env={"CCAMERGE_DEBUG": "1"})
        assert isinstance(res.exception, CheckpointError), res.exception
        assert "error:" not in res.stderr
        assert "Traceback" in "".join(traceback.format_exception(*res.exc_info))
        plain = run(*args)  # and without it, one line again
        assert refused(plain) == f"error: checkpoint {missing} does not exist"
    finally:
        set_debug(False)
    env.unchanged()
