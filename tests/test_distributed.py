"""merge, apply, barrier and eval under torchrun (2 CPU processes, gloo) against one
process, and failures.

Statistics are sums over calibration batches; two processes add them in another
order, so the float64 transforms agree to float64 round-off and the written
float32 tensors to their last bit, except BatchNorm running statistics: one
process takes them from PyTorch's float32 running update, several from float64
sums (ccamerge.maths.bn), which agree to float32 rounding.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

from ccamerge.cli import app
from ccamerge.runtime import distributed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, processes: int = 2) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
        "--nproc-per-node", str(processes), "--master-addr", "127.0.0.1",
        "--master-port", str(free_port()), "-m", "ccamerge", *args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def one_process(*args: str) -> str:
    """The command run in this process, on one thread like each torchrun worker
    (float32 convolutions round differently on two threads: 1e-5 apart after the refit);
    its stdout."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = CliRunner().invoke(app, list(map(str, args)))
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    return result.stdout


def two_processes(*args: str) -> subprocess.CompletedProcess:
    run = torchrun(*map(str, args))
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def largest_relative_difference(a: dict, b: dict, skip: str = "") -> float:
    assert a.keys() == b.keys()
    worst = 0.0
    for k in a:
        if not a[k].is_floating_point() or (skip and skip in k):
            continue
        x, y = a[k].double(), b[k].double()
        worst = max(worst, float((x - y).abs().max() / x.abs().max().clamp_min(1e-300)))
    return worst


def merge_both_ways(tmp_path, checkpoints, data, *options: str):
    """(one process, two processes): merged tensors, transforms, torchrun's result."""
    for name in ("one", "two"):
        args = [
            "merge", *map(str, checkpoints), "--data", str(data), "--batch-size", "64",
            "--output", str(tmp_path / f"{name}.safetensors"),
            "--save-transforms", str(tmp_path / f"{name}-t.safetensors"), "--json", *options,
        ]  # fmt: skip
        if name == "one":
            one_process(*args)
        else:
            run = two_processes(*args)
    load = lambda name: (  # noqa: E731
        load_file(tmp_path / f"{name}.safetensors"),
        load_file(tmp_path / f"{name}-t.safetensors"),
    )
    return load("one"), load("two"), run


def test_no_torchrun_no_process_group(monkeypatch):
    for key in distributed.TORCHRUN_ENV:
        monkeypatch.delenv(key, raising=False)
    assert distributed.setup("cpu") == "cpu"
    assert not torch.distributed.is_initialized()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    batches = [torch.ones(1), torch.zeros(1)]
    assert list(distributed.shard(batches, after_first=lambda: pytest.fail("called"))) == batches
    t = torch.ones(3, dtype=torch.float64)
    distributed.all_reduce_sum([t])
    assert torch.equal(t, torch.ones(3, dtype=torch.float64))
    assert distributed.unshard([1, 2]) == [1, 2]
    assert distributed.claim_failure(1) is None


def test_mlp_two_processes_equal_one(tmp_path, digits_mlps):
    """Two processes split the batches (REPAIR included); one JSON document and one report."""
    (w1, t1), (w2, t2), run = merge_both_ways(
        tmp_path, digits_mlps.paths[:2], digits_mlps.calib_path, "--gamma", "0.1", "--no-refit"
    )
    transforms = largest_relative_difference(t1, t2)
    weights = largest_relative_difference(w1, w2)
    print(f"MLP, 2 processes vs 1: transforms {transforms:.2e}, weights {weights:.2e}")
    assert transforms < 1e-10
    assert weights < 3e-7  # float64 round-off can move a float32 value by one unit
    report = json.loads(run.stdout)  # one document: rank 1 printed nothing
    assert report["num_samples"] + report["check"]["num_samples"] == len(digits_mlps.train)
    assert run.stderr.count("Feature groups") == 1


@pytest.fixture(scope="module")
def resnet_refit(tmp_path_factory, digits_convnets):
    """ResNet14 merged with the refit (the default) in one and in two processes: the
    folder of the files, and what :func:`merge_both_ways` returns. The apply test
    reuses the one-process transforms (``one-t.safetensors``)."""
    folder = tmp_path_factory.mktemp("resnet_refit")
    nets = digits_convnets.nets["resnet_cifar"]
    return folder, merge_both_ways(folder, nets.paths, digits_convnets.calib_path)


def compare_resnet_merges(one, two, refit: bool) -> None:
    (w1, t1), (w2, t2) = one, two
    transforms = largest_relative_difference(t1, t2)
    weights = largest_relative_difference(w1, w2, skip="running_")
    bn = largest_relative_difference(w1, w2)
    print(
        f"ResNet14 {'with' if refit else 'without'} the refit, 2 processes vs 1: transforms "
        f"{transforms:.2e}, weights {weights:.2e}, BatchNorm running statistics {bn:.2e}"
    )
    assert transforms < 1e-10
    tolerance = 1e-5 if refit else 1e-6
    assert weights < tolerance and bn < tolerance


def test_resnet_two_processes_equal_one(tmp_path, digits_convnets):
    """Without the refit: BatchNorm renormalisation, BN reset and the automatic choice of
    gamma (held-out outputs gathered from both processes)."""
    nets = digits_convnets.nets["resnet_cifar"]
    one, two, _ = merge_both_ways(tmp_path, nets.paths, digits_convnets.calib_path, "--no-refit")
    compare_resnet_merges(one, two, refit=False)


def test_resnet_refit_two_processes_equal_one(resnet_refit, digits_convnets):
    """With the refit (the default): each process stores its share of the chunks, and the
    normal equations and BatchNorm moments are summed across ranks before each solve (the
    float64 solves then agree to round-off)."""
    _, (one, two, run) = resnet_refit
    report = json.loads(run.stdout)
    nets = digits_convnets.nets["resnet_cifar"]
    layers = [m for m in nets.models[0].modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert report["refit"]["mode"] == "stored"
    assert len(report["refit"]["layers"]) == len(layers)
    assert report["num_samples"] + report["check"]["num_samples"] == len(digits_convnets.train)
    compare_resnet_merges(one, two, refit=True)


def largest_score_difference(a: dict, b: dict) -> float:
    """The largest difference between the numbers of two evaluation sections."""
    pairs = [(a["ensemble"], b["ensemble"]), *zip(a["models"], b["models"])]
    pairs += [(a["merged"], b["merged"])] if "merged" in a else []
    assert len(a["models"]) == len(b["models"]) and ("merged" in a) == ("merged" in b)
    return max(abs(x[k] - y[k]) for x, y in pairs for k in ("loss", "accuracy"))


def test_apply_two_processes_equal_one(resnet_refit, digits_convnets):
    """``apply`` with --data refits (as recorded in the transforms) on each process's share
    of the chunks, and scores on --eval-data from the gathered outputs."""
    folder, _ = resnet_refit
    nets = digits_convnets.nets["resnet_cifar"]
    docs, outputs = [], []
    for name, command in (("one", one_process), ("two", two_processes)):
        output = folder / f"apply-{name}.safetensors"
        result = command(
            "apply", *nets.paths, "--transforms", folder / "one-t.safetensors", "--data",
            digits_convnets.calib_path, "--eval-data", digits_convnets.test_path,
            "--batch-size", "64", "--output", output, "--json",
        )  # fmt: skip
        docs.append(json.loads(result if name == "one" else result.stdout))
        outputs.append(load_file(output))
    assert [d["refit"]["mode"] for d in docs] == ["stored", "stored"]
    assert docs[0]["num_samples"] == docs[1]["num_samples"]
    assert docs[0]["num_samples"] + docs[0]["check"]["num_samples"] == len(digits_convnets.train)
    weights = largest_relative_difference(*outputs, skip="running_")
    bn = largest_relative_difference(*outputs)
    scores = largest_score_difference(docs[0]["evaluation"], docs[1]["evaluation"])
    print(
        f"apply (ResNet14, refit), 2 processes vs 1: weights {weights:.2e}, BatchNorm "
        f"running statistics {bn:.2e}, loss/accuracy {scores:.2e}"
    )
    assert weights < 1e-5 and bn < 1e-5 and scores < 1e-6


def test_barrier_two_processes_equal_one(tmp_path, digits_convnets):
    """``barrier``: statistics, BatchNorm reset at every t and the evaluations split across
    the processes; the curves agree, and only rank 0 writes the CSV."""
    nets = digits_convnets.nets["resnet_cifar"]
    docs = []
    for name, command in (("one", one_process), ("two", two_processes)):
        result = command(
            "barrier", *nets.paths, "--eval-data", digits_convnets.test_path, "--data",
            digits_convnets.calib_path, "--num-samples", "256", "--methods", "average,cca",
            "--gamma", "0.1", "--steps", "3", "--batch-size", "64", "--json",
            "--csv", tmp_path / f"{name}.csv",
        )  # fmt: skip
        docs.append(json.loads(result if name == "one" else result.stdout))
    one, two = docs
    assert one["num_samples"] == two["num_samples"] == 256
    assert one["t"] == two["t"] and one["curves"].keys() == two["curves"].keys()
    worst = max(
        abs(p[k] - q[k])
        for m in one["curves"]
        for p, q in zip(one["curves"][m], two["curves"][m], strict=True)
        for k in ("loss", "accuracy")
    )
    print(f"barrier (ResNet14, average and cca), 2 processes vs 1: loss/accuracy {worst:.2e}")
    assert worst < 1e-5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.csv", "two.csv"]


def test_eval_two_processes_equal_one(digits_mlps):
    """``eval``: each process scores its share of the batches (the activation check too);
    the same numbers and warnings."""
    args = ("eval", *digits_mlps.paths[:2], "--data", digits_mlps.test_path, "--ensemble",
            "--batch-size", "64", "--json")  # fmt: skip
    one = json.loads(one_process(*args))
    two = json.loads(two_processes(*args).stdout)
    worst = largest_score_difference(one, two)
    print(f"eval (MLP), 2 processes vs 1: loss/accuracy {worst:.2e}")
    assert worst < 1e-6
    assert one["warnings"] == two["warnings"] and one["num_samples"] == two["num_samples"]


def test_failure_on_one_rank_ends_both(tmp_path, digits_mlps):
    """Batch 1 (rank 1's first) overflows: one error line, non-zero exit, no file."""
    x = digits_mlps.train.x.clone()
    x[64:128] = 3e38 * torch.where(x[64:128] < 0.5, -1.0, 1.0)
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=x.numpy())
    out = tmp_path / "m.safetensors"
    run = torchrun(
        "merge", *map(str, digits_mlps.paths[:2]), "--data", str(bad), "--gamma", "0.1",
        "--batch-size", "64", "--output", str(out), "--save-transforms",
        str(tmp_path / "t.safetensors"),
    )  # fmt: skip
    assert run.returncode != 0
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        "error: non-finite activations at layers.1 (input of group hidden0): the models "
        "overflow on this data (check the input scaling and the checkpoints)"
    ], run.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.npz"]
