"""Distillation against the inputs' mean logits (ccamerge/maths/distill.py) and the
unlabelled check of a merge (ccamerge/pipeline/check.py), on the digits MLPs and the
digits ResNet14."""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ccamerge.maths.bn import reset_batchnorm
from ccamerge.maths.distill import (
    DistillSettings,
    EpochMetrics,
    _better,
    _DistillationLoss,
    augment_batch,
    cut_batches,
    distill,
    kl_per_sample,
    mean_logits,
)
from ccamerge.models.registry import get_architecture
from ccamerge.pipeline import Calibration, check_merge, load_models, score_outputs
from ccamerge.runtime.errors import DataError, OptionError

WORKER = Path(__file__).parent / "distill_worker.py"


def average(models):
    """The plain (unaligned) weight average of models of one architecture."""
    out = copy.deepcopy(models[0])
    sds = [m.state_dict() for m in models]
    out.load_state_dict({k: sum(sd[k] for sd in sds) / len(sds) for k in sds[0]})
    return out


def weights_of(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def largest_difference(a, b):
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def test_a_student_equal_to_its_teachers_is_left_exactly_as_it_was(digits_mlps):
    """Teachers identical, student a copy of them: the loss and its gradient are exactly
    zero, so Adam does not move a weight, and the agreement stays 1."""
    teacher = digits_mlps.models[0]
    student = copy.deepcopy(teacher)
    before = weights_of(student)
    report = distill(
        student, [teacher, teacher], [0.5, 0.5], lambda: [digits_mlps.train.x],
        digits_mlps.test.x, DistillSettings(epochs=3, lr=1e-3),
    )  # fmt: skip
    assert largest_difference(before, weights_of(student)) == 0
    assert [m.agreement for m in report.history] == [1.0] * 4
    assert [m.kl for m in report.history] == [0.0] * 4
    assert report.epoch_kept == 3 and report.stopped == "epochs"


def test_the_loss_gradient_is_the_exact_one():
    s = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 4, dtype=torch.float64)
    for temperature in (1.0, 3.0):
        loss = _DistillationLoss.apply(s, t, temperature)
        expected = kl_per_sample(t, s, temperature).sum() * temperature**2
        assert torch.allclose(loss, expected, rtol=1e-12)
        torch.autograd.gradcheck(lambda x, T=temperature: _DistillationLoss.apply(x, t, T), (s,))


def test_distillation_brings_an_unaligned_average_towards_the_ensemble(digits_mlps):
    teachers = digits_mlps.models[:2]
    student = average(teachers)
    train, held = digits_mlps.train.x, digits_mlps.test.x
    seen = []
    settings = DistillSettings(epochs=4, lr=1e-3)
    report = distill(
        student, teachers, [0.5, 0.5], lambda: [train], held, settings,
        on_epoch=lambda e, total, m: seen.append((e, total, m)),
    )  # fmt: skip
    start, final = report.history[0], report.final
    print(f"unaligned average, 4 epochs: held-out KL {start.kl:.3f} -> {final.kl:.3f}, "
          f"agreement {start.agreement:.3f} -> {final.agreement:.3f}")  # fmt: skip
    assert final.kl < start.kl / 2 and final.agreement > start.agreement
    # the report agrees with a fresh scoring of the returned student
    with torch.no_grad():
        _, kl, agreement, _ = score_outputs(
            student(held), mean_logits(teachers, [0.5, 0.5], held), None, "agreement"
        )
    assert final.agreement == agreement and final.kl == pytest.approx(kl, rel=1e-9)
    assert final.kl == report.history[-1].kl  # no BatchNorm: the last epoch as scored
    assert [(e, total) for e, total, _ in seen] == [(e, 4) for e in range(5)]
    assert [m for _, _, m in seen] == list(report.history)
    assert all(m.train_loss > 0 for m in report.history[1:])
    batches = len(train) // 128
    assert report.steps == 4 * batches and report.train_samples == len(train)
    work = report.forward_equivalents
    assert work["student_training"] == pytest.approx(3 * 4 * batches * 128 / len(train))
    assert work["teachers_training"] == pytest.approx(2 * 4 * batches * 128 / len(train))
    assert work["total"] == pytest.approx(sum(v for k, v in work.items() if k != "total"))
    doc = report.to_dict()
    assert doc["epochs_run"] == 4 and doc["settings"]["lr"] == 1e-3 and len(doc["history"]) == 5


def test_auto_stops_after_patience_and_restores_the_best_epoch(digits_mlps):
    """From epoch 3 on the training source yields noise (the first call of ``batches``
    is the scan): the held-out scores stop improving, training stops ``patience``
    epochs after the best one, and the student ends with that epoch's weights."""
    teachers = digits_mlps.models[:2]
    student = average(teachers)
    noise = 10 * torch.randn(1300, 64, generator=torch.Generator().manual_seed(0))
    calls = []

    def batches():
        calls.append(None)
        return [digits_mlps.train.x] if len(calls) <= 3 else [noise]

    snapshots = {}
    settings = DistillSettings(epochs="auto", lr=1e-3, patience=2, max_epochs=12)
    report = distill(
        student, teachers, [0.5, 0.5], batches, digits_mlps.test.x, settings,
        on_epoch=lambda e, total, m: snapshots.__setitem__(e, weights_of(student)),
    )  # fmt: skip
    history = report.history
    best = min(history, key=lambda m: (m.kl, -m.agreement, m.epoch))
    assert report.stopped == "patience"
    assert report.epoch_kept == best.epoch >= 1
    assert report.epochs_run == report.epoch_kept + 2 < 12
    assert largest_difference(weights_of(student), snapshots[report.epoch_kept]) == 0
    assert report.final.kl == best.kl


def test_an_epoch_improves_by_a_lower_held_out_kl():
    """Agreement on a few hundred held-out samples moves by whole samples; the KL, the
    objective itself, decides (agreement breaks ties)."""
    start = EpochMetrics(0, 0.90, 0.05)
    assert _better(EpochMetrics(1, 0.90, 0.04), start)
    assert _better(EpochMetrics(1, 0.895, 0.04), start)  # one sample fewer, a lower KL
    assert not _better(EpochMetrics(1, 0.95, 0.06), start)
    assert _better(EpochMetrics(1, 0.91, 0.05), start) and not _better(start, start)


def test_the_start_is_kept_when_no_epoch_improves_on_it(digits_mlps):
    """The student starts equal to the ensemble (teacher 0, weighted 1); weight decay
    moves it away, so no epoch beats the start, which is restored."""
    teacher = digits_mlps.models[0]
    student = copy.deepcopy(teacher)
    settings = DistillSettings(epochs="auto", lr=1e-2, weight_decay=0.1, patience=2)
    report = distill(
        student, [teacher, digits_mlps.models[1]], [1.0, 0.0], lambda: [digits_mlps.train.x],
        digits_mlps.test.x, settings,
    )  # fmt: skip
    assert (report.epoch_kept, report.epochs_run, report.stopped) == (0, 2, "patience")
    assert all(m.kl > 0 for m in report.history[1:])
    assert largest_difference(weights_of(student), weights_of(teacher)) == 0


def test_the_same_seed_gives_the_same_weights_and_another_seed_others(digits_mlps):
    teachers = digits_mlps.models[:2]

    def run(seed):
        student = average(teachers)
        distill(
            student, teachers, [0.5, 0.5], lambda: [digits_mlps.train.x], digits_mlps.test.x,
            DistillSettings(epochs=2, lr=1e-3, seed=seed),
        )  # fmt: skip
        return weights_of(student)

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert largest_difference(a, c) > 1e-4


def test_a_non_finite_loss_stops_and_restores_the_best_weights(digits_mlps):
    """One training row overflows the teachers: the loss turns NaN in epoch 1, training
    stops and the student keeps its starting weights (epoch 0, the best so far)."""
    teachers = digits_mlps.models[:2]
    student = average(teachers)
    before = weights_of(student)
    x = digits_mlps.train.x.clone()
    x[5] = 3e38
    report = distill(
        student, teachers, [0.5, 0.5], lambda: [x], digits_mlps.test.x,
        DistillSettings(epochs=3, lr=1e-3),
    )  # fmt: skip
    assert report.stopped == "non-finite loss in epoch 1"
    assert report.epoch_kept == 0 and report.epochs_run == 1
    assert largest_difference(before, weights_of(student)) == 0


@pytest.fixture(scope="module")
def resnets(digits_convnets):
    nets = digits_convnets.nets["resnet_cifar"]
    entry = get_architecture("resnet_cifar")

    def build(state_dict):
        model = entry.build(nets.config)
        model.load_state_dict(state_dict)
        return model.eval()

    return [build(m.state_dict()) for m in nets.models], digits_convnets


def test_batchnorm_train_ends_with_recomputed_statistics(resnets):
    """With augmentation (flips and crops) and BatchNorm in train mode, the running
    statistics at the end are those of a fresh recomputation on the training data."""
    teachers, data = resnets
    student = average(teachers)
    train, held = data.train.x[:512], data.test.x[:256]
    settings = DistillSettings(epochs=1, batch_size=64, augment=("flip", "crop"), crop_padding=2)
    report = distill(student, teachers, [0.5, 0.5], lambda: train.split(200), held, settings)
    fresh = copy.deepcopy(student)
    reset_batchnorm(fresh, train.split(64))
    stats = [k for k in fresh.state_dict() if "running_" in k]
    assert stats and all(torch.equal(student.state_dict()[k], fresh.state_dict()[k]) for k in stats)
    assert report.forward_equivalents["batchnorm"] == 1.0
    assert not student.training


def test_batchnorm_frozen_keeps_the_running_statistics(resnets):
    teachers, data = resnets
    student = average(teachers)
    before = weights_of(student)
    settings = DistillSettings(epochs=1, batch_size=64, batchnorm="frozen")
    report = distill(
        student, teachers, [0.5, 0.5], lambda: [data.train.x[:256]], data.test.x[:128], settings
    )
    after = weights_of(student)
    assert all(torch.equal(before[k], after[k]) for k in before if "running_" in k)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("bn1.weight"))
    assert report.forward_equivalents["batchnorm"] == 0.0


def test_flips_and_crops_move_pixels_as_they_say():
    x = torch.arange(2 * 3 * 5 * 6, dtype=torch.float32).reshape(2, 3, 5, 6)
    flipped = augment_batch(x, ("flip",), 4, torch.Generator().manual_seed(1))
    for image, out in zip(x, flipped):
        assert torch.equal(out, image) or torch.equal(out, image.flip(2))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    cropped = augment_batch(x, ("crop",), 2, torch.Generator().manual_seed(1))
    for k in range(2):
        windows = [padded[k, :, i : i + 5, j : j + 6] for i in range(5) for j in range(5)]
        assert any(torch.equal(cropped[k], w) for w in windows)


def test_batches_are_cut_across_chunks_and_shuffled_within_them():
    chunks = [torch.arange(0, 5.0)[:, None], torch.arange(5, 12.0)[:, None]]
    assert [b[:, 0].tolist() for b in cut_batches(chunks, 4)] == [
        [0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11],
    ]  # fmt: skip
    assert [len(b) for b in cut_batches(chunks, 5)] == [5, 5, 2]
    assert [len(b) for b in cut_batches(chunks, 5, drop_last=True)] == [5, 5]
    shuffled = torch.cat(list(cut_batches(chunks, 4, torch.Generator().manual_seed(0))))
    assert sorted(shuffled[:, 0].tolist()) == list(range(12))
    assert set(shuffled[:5, 0].tolist()) | set(shuffled[5:, 0].tolist()) == set(range(12))


@pytest.mark.parametrize(
    "bad",
    [
        {"epochs": 0}, {"epochs": "forever"}, {"epochs": True}, {"lr": float("nan")},
        {"lr": 0.0}, {"temperature": -1.0}, {"warmup": 1.0}, {"batch_size": 1},
        {"augment": ("rotate",)}, {"augment": "flip"}, {"augment": ("flip", "flip")},
        {"batchnorm": "fused"}, {"patience": 0}, {"max_epochs": 2.5}, {"weight_decay": -0.1},
    ],
)  # fmt: skip
def test_bad_settings_are_refused_in_one_line(bad):
    with pytest.raises(OptionError) as error:
        DistillSettings(**bad)
    assert "\n" not in str(error.value)


def test_augmentation_needs_images_and_data_must_fit(digits_mlps):
    teachers = digits_mlps.models[:2]
    args = (copy.deepcopy(teachers[0]), teachers, [0.5, 0.5], lambda: [digits_mlps.train.x])
    with pytest.raises(OptionError, match=r"needs image inputs of shape \(N, C, H, W\)"):
        distill(*args, digits_mlps.test.x, DistillSettings(augment=("flip",)))
    with pytest.raises(DataError, match="held-out inputs"):
        distill(*args, digits_mlps.test.x[:, :10], DistillSettings())
    with pytest.raises(OptionError, match="sum to 1"):
        distill(args[0], teachers, [1.0, 1.0], args[3], digits_mlps.test.x, DistillSettings())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path, digits_mlps):
    """Under torchrun (2 CPU processes, gloo) each rank trains on half of every batch and
    DistributedDataParallel averages the gradients: the same student to float tolerance."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parent.parent)}
    paths = [str(p) for p in digits_mlps.paths[:2]]
    one = subprocess.run(
        [sys.executable, str(WORKER), *paths, str(tmp_path / "one.pt")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node",
            "2", "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(WORKER),
            *paths, str(tmp_path / "two.pt"),
        ],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (torch.load(tmp_path / f"{n}.pt") for n in ("one", "two"))
    weights = largest_difference(a["state"], b["state"])
    scores = max(
        abs(p[k] - q[k])
        for p, q in zip(a["report"]["history"], b["report"]["history"], strict=True)
        for k in ("agreement", "kl", "train_loss")
        if p[k] is not None
    )
    print(f"distillation, 2 processes vs 1: weights {weights:.2e}, held-out scores {scores:.2e}")
    assert weights < 1e-5 and scores < 1e-5
    assert a["report"]["steps"] == b["report"]["steps"] == 2 * (len(digits_mlps.train) // 64)
    assert a["report"]["history"][-1]["kl"] < a["report"]["history"][0]["kl"]


def test_the_check_flags_an_unaligned_average(digits_mlps):
    loaded = load_models([str(p) for p in digits_mlps.paths[:2]])
    merged = average([loaded.build(sd) for sd in loaded.state_dicts])
    check = check_merge(loaded, merged, Calibration(digits_mlps.test, 128), [0.5, 0.5])
    assert check.beaten_by == loaded.paths
    assert all(
        m.kl < check.merged.kl and m.agreement > check.merged.agreement for m in check.inputs
    )
    doc = check.to_dict()
    assert doc["beaten_by"] == loaded.paths and doc["num_samples"] == len(digits_mlps.test)
    assert doc["inputs"][0].keys() == {"name", "top1_agreement", "kl", "paired_se"}
    best = max(check.inputs, key=lambda m: m.agreement)
    assert best.name in check.warning() and "--distill auto" in check.warning()
    gap = 100 * (best.agreement - check.merged.agreement)
    assert f"{gap:.1f} ± {100 * best.paired_se:.1f} points" in check.warning()


def test_the_paired_standard_error_of_an_agreement_difference():
    """Exact on a small case: 10 rows, 3 where only a agrees, 1 where only b does:
    p10 = 0.3, p01 = 0.1, SE = sqrt((0.4 - 0.04) / 10) = 0.18974; identical vectors: 0."""
    from ccamerge.pipeline.check import paired_standard_error

    a = torch.tensor([1, 1, 1, 0, 1, 1, 0, 0, 1, 0], dtype=torch.bool)
    b = torch.tensor([0, 0, 0, 1, 1, 1, 0, 0, 1, 0], dtype=torch.bool)
    assert paired_standard_error(a, b) == pytest.approx((0.36 / 10) ** 0.5, rel=1e-12)
    assert paired_standard_error(a, a) == 0.0


class Ensemble(torch.nn.Module):
    """The models' mean logits: the merge the check compares everything with."""

    def __init__(self, models: list[torch.nn.Module]) -> None:
        super().__init__()
        self.models = torch.nn.ModuleList(models)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(m(x) for m in self.models) / len(self.models)


def test_the_check_is_quiet_on_a_perfect_merge_and_on_identical_inputs(digits_mlps):
    paths = [str(p) for p in digits_mlps.paths[:2]]
    loaded = load_models(paths)
    test = Calibration(digits_mlps.test, 128)
    ensemble = Ensemble([loaded.build(sd) for sd in loaded.state_dicts])
    perfect = check_merge(loaded, ensemble, test, [0.5, 0.5])
    assert perfect.merged.agreement == 1.0 and perfect.merged.kl < 1e-12
    assert perfect.beaten_by == [] and perfect.warning() is None
    assert all(m.agreement < 1.0 for m in perfect.inputs)  # the inputs disagree somewhere
    same = load_models([paths[0], paths[0]])
    check = check_merge(same, same.build(same.state_dicts[0]), test, [0.5, 0.5])
    assert check.beaten_by == [] and check.warning() is None
    assert [(m.agreement, m.kl) for m in (check.merged, *check.inputs)] == [(1.0, 0.0)] * 3


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_distillation_on_cuda_matches_the_cpu(digits_mlps):
    """The student trains on its own device; the same batches and augmentations (drawn
    on the CPU) give the CPU's result to float32 rounding amplified by Adam."""
    teachers = digits_mlps.models[:2]
    settings = DistillSettings(epochs=2, lr=1e-3)
    results = []
    for device in ("cpu", "cuda"):
        student = average(teachers).to(device)
        on_device = [copy.deepcopy(t).to(device) for t in teachers]
        report = distill(
            student, on_device, [0.5, 0.5], lambda: [digits_mlps.train.x],
            digits_mlps.test.x, settings,
        )  # fmt: skip
        assert next(student.parameters()).device.type == device
        results.append((weights_of(student), report))
    (cpu, cpu_report), (gpu, gpu_report) = results
    scale = max(float(v.abs().max()) for v in cpu.values())
    assert largest_difference(cpu, gpu) < 1e-3 * scale
    assert gpu_report.final.kl == pytest.approx(cpu_report.final.kl, rel=1e-3)
