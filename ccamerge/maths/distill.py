"""Distillation: train a (merged) student end to end against its teachers' mean logits.

The target of every training batch is the weighted mean of the teachers' logits on
that (augmented) batch, computed on the fly (teachers in eval mode, no gradients). The
loss is KL(p_teacher || p_student) of the softmaxes at temperature T, times T^2, the
mean over the batch; Adam with a linear warm-up and a cosine decay to 0. After every
epoch the student is scored on held-out inputs (never trained on) against the
teachers' mean logits there: top-1 agreement and mean KL at temperature 1. With
``epochs="auto"`` training stops after ``patience`` epochs without improvement (a lower
held-out KL; agreement breaks ties) and the
best epoch's weights (the start counts as epoch 0) are restored. With BatchNorm in
"train" mode, the running statistics are recomputed on the training data at the end
(:func:`ccamerge.maths.bn.reset_batchnorm`).

Under torchrun (:mod:`ccamerge.runtime.distributed`) the student is wrapped in
``DistributedDataParallel``: every rank draws the same batches and augmentations
(the same seeded generator), takes its slice of every batch, and PyTorch averages the
gradients; the held-out sums and the final BatchNorm statistics are added across
ranks. See docs/distill.md.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..io.padding import real_positions, real_rows
from ..models.outputs import logits_of
from ..runtime import distributed
from ..runtime.errors import DataError, NumericalError, OptionError
from .bn import has_batchnorm, reset_batchnorm

AUGMENTATIONS = ("flip", "crop")
BATCHNORM_MODES = ("train", "frozen")
BACKWARD_COST = 2.0  # a backward pass counted as two forward passes


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class DistillSettings:
    """Every knob of :func:`distill`; invalid values raise :class:`OptionError`."""

    epochs: int | str = "auto"  # a number of epochs, or "auto": while the held-out KL falls
    # "auto": epochs without improvement before stopping. 6, not 3: the held-out KL often
    # rises for the first epochs (the warm-up's peak learning rate) and then falls below
    # the start (measured: docs/benchmarks.md, "auto's patience")
    patience: int = 6
    max_epochs: int = 30  # "auto": at most this many epochs (the schedule's length)
    lr: float = 3e-4  # Adam's peak learning rate
    warmup: float = 0.05  # fraction of the steps with a linear warm-up, then cosine to 0
    weight_decay: float = 0.0  # Adam's L2 penalty
    temperature: float = 1.0
    batch_size: int = 128
    augment: tuple[str, ...] = ()  # any of "flip", "crop" (4-D image inputs only)
    crop_padding: int = 4  # "crop": zero padding on each side before a random crop
    batchnorm: str = "train"  # "train" (statistics recomputed at the end) or "frozen"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs != "auto" and not (_is_int(self.epochs) and self.epochs >= 1):
            raise OptionError(
                f"distillation epochs must be 'auto' or at least 1, got {self.epochs!r}"
            )
        for name in ("patience", "max_epochs", "crop_padding"):
            value = getattr(self, name)
            if not (_is_int(value) and value >= 1):
                raise OptionError(
                    f"distillation {name} must be an integer of at least 1, got {value!r}"
                )
        if not (_is_int(self.batch_size) and self.batch_size >= 2):
            raise OptionError(
                f"distillation batch size must be at least 2, got {self.batch_size!r}"
            )
        if not _is_int(self.seed):
            raise OptionError(f"distillation seed must be an integer, got {self.seed!r}")
        _check_real("learning rate", self.lr, positive=True)
        _check_real("temperature", self.temperature, positive=True)
        _check_real("weight decay", self.weight_decay, positive=False)
        _check_real("warm-up", self.warmup, positive=False)
        if self.warmup >= 1:
            raise OptionError(
                f"distillation warm-up is a fraction of the steps in [0, 1), got {self.warmup!r}"
            )
        if isinstance(self.augment, str) or not isinstance(self.augment, tuple):
            raise OptionError(
                f"distillation augment must be a tuple of names, got {self.augment!r}"
            )
        unknown = [a for a in self.augment if a not in AUGMENTATIONS]
        if unknown or len(set(self.augment)) != len(self.augment):
            raise OptionError(
                f"unknown or repeated augmentation in {', '.join(map(str, self.augment))}: "
                f"choose among {', '.join(AUGMENTATIONS)}"
            )
        if self.batchnorm not in BATCHNORM_MODES:
            raise OptionError(
                f"distillation BatchNorm handling must be one of {', '.join(BATCHNORM_MODES)}, "
                f"got {self.batchnorm!r}"
            )

    @property
    def auto(self) -> bool:
        return self.epochs == "auto"

    @property
    def epoch_limit(self) -> int:
        """The most epochs a run trains, and the length of the learning-rate schedule."""
        return self.max_epochs if self.auto else int(self.epochs)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "augment": list(self.augment)}


def _check_real(name: str, value: Any, positive: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        need = "positive" if positive else "non-negative"
        raise OptionError(f"distillation {name} must be finite and {need}, got {value!r}")


@dataclass(frozen=True)
class EpochMetrics:
    """Held-out scores after ``epoch`` epochs (0: before training)."""

    epoch: int
    agreement: float  # top-1 agreement with the teachers' mean logits
    kl: float  # mean KL(p_teachers || p_student) at temperature 1
    train_loss: float | None = None  # the epoch's mean training loss (None for epoch 0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DistillReport:
    settings: DistillSettings
    history: tuple[EpochMetrics, ...]  # epoch 0 (before training), then each epoch trained
    epoch_kept: int  # whose weights the student ends with
    final: EpochMetrics  # the student as returned (after the BatchNorm recomputation)
    stopped: str  # why training ended
    train_samples: int  # rows of the training data (one epoch)
    heldout_samples: int
    steps: int  # optimiser steps taken
    seconds: float
    forward_equivalents: dict[
        str, float
    ]  # work, in forward passes of one model over the training data

    @property
    def epochs_run(self) -> int:
        return self.history[-1].epoch

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings.to_dict(),
            "history": [m.to_dict() for m in self.history],
            "epochs_run": self.epochs_run,
            "epoch_kept": self.epoch_kept,
            "final": self.final.to_dict(),
            "stopped": self.stopped,
            "train_samples": self.train_samples,
            "heldout_samples": self.heldout_samples,
            "steps": self.steps,
            "seconds": self.seconds,
            "forward_equivalents": dict(self.forward_equivalents),
        }


def kl_per_sample(target: torch.Tensor, logits: torch.Tensor, temperature: float = 1.0):
    """KL(softmax(target / T) || softmax(logits / T)) for each row."""
    log_p = F.log_softmax(target / temperature, 1)
    log_q = F.log_softmax(logits / temperature, 1)
    return (log_p.exp() * (log_p - log_q)).sum(1)


class _DistillationLoss(torch.autograd.Function):
    """``sum_rows KL(softmax(t / T) || softmax(s / T)) * T^2`` for student logits ``s`` and
    target logits ``t``. Its gradient with respect to ``s``, ``T (softmax(s / T) -
    softmax(t / T))``, takes both softmaxes from the same computation, so a student
    whose logits equal the targets gets an exactly zero gradient (autograd's log-softmax
    backward leaves a round-off residue there, which Adam would scale up to full steps)."""

    @staticmethod
    def forward(ctx, s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
        log_p = F.log_softmax(t / temperature, 1)
        log_q = F.log_softmax(s / temperature, 1)
        p = log_p.exp()
        ctx.save_for_backward(p, log_q.exp())
        ctx.temperature = temperature
        return (p * (log_p - log_q)).sum() * temperature**2

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        p, q = ctx.saved_tensors
        return grad * ctx.temperature * (q - p), None, None


def logit_rows(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A model's logits on ``x`` as rows: (batch, classes) as they are, a language model's
    (batch, length, vocabulary) one row per position (each position is distilled; the
    padded positions of padded token ids left out)."""
    if out.ndim == 3:
        return real_rows(out, real_positions(x)).reshape(-1, out.shape[-1])
    if out.ndim != 2:
        raise OptionError(
            f"distillation trains on (batch, classes) or (batch, length, vocabulary) logits; "
            f"the models give outputs of shape {tuple(out.shape)}"
        )
    return out


@torch.no_grad()
def mean_logits(teachers: Sequence[nn.Module], weights: Sequence[float], x: torch.Tensor):
    """The teachers' weighted mean logits on ``x`` as rows (:func:`logit_rows`; teachers
    in eval mode, float32)."""
    return sum(w * logit_rows(logits_of(t(x)).float(), x) for t, w in zip(teachers, weights))


def cut_batches(
    chunks: Iterable[torch.Tensor],
    batch_size: int,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> Iterator[torch.Tensor]:
    """Batches of ``batch_size`` rows from a stream of chunks of any size; with a
    ``generator`` the rows of each chunk are shuffled first (a source that yields the
    whole data as one tensor gets a full shuffle). ``drop_last``: no final smaller batch."""
    pending: list[torch.Tensor] = []
    held = 0
    for chunk in chunks:
        if generator is not None:
            chunk = chunk[torch.randperm(chunk.shape[0], generator=generator)]
        pending.append(chunk)
        held += chunk.shape[0]
        if held < batch_size:
            continue
        rows = torch.cat(pending)
        full = rows.shape[0] - rows.shape[0] % batch_size
        yield from rows[:full].split(batch_size)
        pending, held = [rows[full:]], rows.shape[0] - full
    if held and not drop_last:
        yield torch.cat(pending)


def augment_batch(
    x: torch.Tensor, augment: Sequence[str], padding: int, generator: torch.Generator
) -> torch.Tensor:
    """Random horizontal flips (half the images) and/or random crops of the image padded
    with ``padding`` zeros on each side, per image of a (N, C, H, W) batch. The random
    numbers come from ``generator`` (on the CPU), whatever the device."""
    n, _, h, w = x.shape
    if "flip" in augment:
        flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    if "crop" in augment:
        top = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(x.device)
        left = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(x.device)
        padded = F.pad(x, (padding, padding, padding, padding))
        rows = (top[:, None] + torch.arange(h, device=x.device))[:, :, None]
        cols = (left[:, None] + torch.arange(w, device=x.device))[:, None, :]
        images = torch.arange(n, device=x.device)[:, None, None]
        x = padded.permute(0, 2, 3, 1)[images, rows, cols].permute(0, 3, 1, 2).contiguous()
    return x


def _scan(batches: Callable[[], Iterable[torch.Tensor]], settings: DistillSettings):
    """One pass over the training source: its row count and sample shape, checked."""
    rows, shape = 0, None
    for chunk in batches():
        numbers = isinstance(chunk, torch.Tensor) and chunk.dtype != torch.bool
        if not numbers or chunk.ndim < 2 or chunk.is_complex():  # token ids are integers
            raise DataError("distillation data must be tensors of numbers of shape (N, ...)")
        if shape is not None and chunk.shape[1:] != shape:
            raise DataError(
                f"distillation data changes shape: rows of {tuple(shape)} then {tuple(chunk.shape[1:])}"
            )
        rows, shape = rows + chunk.shape[0], chunk.shape[1:]
    if shape is None or rows < 2 * distributed.world_size():
        raise DataError(
            f"distillation needs at least {2 * distributed.world_size()} training samples, got {rows}"
        )
    if settings.augment and len(shape) != 3:
        raise OptionError(
            f"augmentation {', '.join(settings.augment)} needs image inputs of shape (N, C, H, W); "
            f"the distillation data has rows of shape {tuple(shape)}"
        )
    return rows, shape


def _check_models(student: nn.Module, teachers: Sequence[nn.Module], weights: Sequence[float]):
    if not teachers or len(weights) != len(teachers):
        raise OptionError(f"{len(weights)} weights given for {len(teachers)} teacher model(s)")
    if any(not math.isfinite(w) or w < 0 for w in weights) or abs(sum(weights) - 1) > 1e-6:
        raise OptionError("distillation weights must be non-negative and sum to 1")
    device = next(student.parameters()).device
    for t in teachers:
        if next(t.parameters()).device != device:
            raise OptionError(f"teachers and student must share one device ({device})")
    return device


class _Heldout:
    """The held-out inputs in this rank's share of batches, with the teachers' targets."""

    def __init__(self, heldout, teachers, weights, batch_size, device) -> None:
        self.parts = [
            (x.to(device), mean_logits(teachers, weights, x.to(device)))
            for x in distributed.shard(heldout.split(batch_size))
        ]
        rows = torch.tensor([sum(len(target) for _, target in self.parts)], dtype=torch.float64)
        distributed.all_reduce_sum([rows])
        self.size = int(rows)  # samples, or for a language model positions

    @torch.no_grad()
    def score(self, student: nn.Module, epoch: int, train_loss: float | None) -> EpochMetrics:
        """Agreement and mean KL of ``student`` (eval mode), summed across ranks."""
        student.eval()
        sums = torch.zeros(2, dtype=torch.float64)
        for x, target in self.parts:
            logits = logit_rows(logits_of(student(x)).float(), x)
            sums[0] += float((logits.argmax(1) == target.argmax(1)).sum())
            sums[1] += float(kl_per_sample(target.double(), logits.double()).sum())
        distributed.all_reduce_sum([sums])
        return EpochMetrics(
            epoch, float(sums[0]) / self.size, float(sums[1]) / self.size, train_loss
        )


def _better(a: EpochMetrics, b: EpochMetrics) -> bool:
    """``a`` improves on ``b``: a lower held-out KL (the training objective, measured on
    samples it never trained on; it moves smoothly where agreement on a few hundred samples
    moves by whole samples), or the same KL and a higher agreement."""
    return (-a.kl, a.agreement) > (-b.kl, b.agreement)


def _learning_rate(step: int, total: int, settings: DistillSettings) -> float:
    """Linear warm-up over the first ``warmup * total`` steps, then cosine to 0."""
    warm = round(settings.warmup * total)
    if step < warm:
        return settings.lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return settings.lr * 0.5 * (1 + math.cos(math.pi * progress))


def _train_mode(student: nn.Module, batchnorm: str) -> None:
    student.train()
    if batchnorm == "frozen":
        for m in student.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def _wrap(student: nn.Module, device: torch.device) -> nn.Module:
    if not distributed.is_distributed():
        return student
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(student, device_ids=ids)


def _cuda_index(device: torch.device) -> list[int]:
    """The CUDA device whose random state :func:`torch.random.fork_rng` keeps (none on CPU)."""
    if device.type != "cuda":
        return []
    return [torch.cuda.current_device() if device.index is None else device.index]


def _snapshot(student: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in student.state_dict().items()}


@dataclass
class _Run:
    """What every epoch and step of one distillation needs."""

    teachers: Sequence[nn.Module]
    weights: Sequence[float]
    batches: Callable[[], Iterable[torch.Tensor]]
    settings: DistillSettings
    batch_size: int
    total_steps: int
    generator: torch.Generator
    device: torch.device
    steps: int = 0


def distill(
    student: nn.Module,
    teachers: Sequence[nn.Module],
    weights: Sequence[float],
    batches: Callable[[], Iterable[torch.Tensor]],
    heldout: torch.Tensor,
    settings: DistillSettings = DistillSettings(),
    on_epoch: Callable[[int, int, EpochMetrics], None] | None = None,
) -> DistillReport:
    """Train ``student`` in place against the teachers' weighted mean logits.

    ``weights``: the teachers' weights (non-negative, summing to 1). ``batches()``
    returns a fresh iterable of input tensors (chunks of any size, e.g. read from disk)
    for every pass; ``heldout`` (inputs never trained on) scores every epoch.
    ``on_epoch(epoch, total, metrics)`` is called after each evaluation, epoch 0
    (before training) included, on every rank. The student ends in eval mode on its
    device; the teachers are put in eval mode."""
    device = _check_models(student, teachers, weights)
    rows, shape = _scan(batches, settings)
    if heldout.ndim < 2 or heldout.shape[0] == 0 or heldout.shape[1:] != shape:
        raise DataError(
            f"held-out inputs of shape {tuple(heldout.shape)} do not fit training rows "
            f"of shape {tuple(shape)}"
        )
    start = time.perf_counter()
    for t in teachers:
        t.eval()
    batch_size = min(settings.batch_size, rows)
    run = _Run(
        teachers, weights, batches, settings, batch_size,
        total_steps=(rows // batch_size) * settings.epoch_limit,
        generator=torch.Generator().manual_seed(settings.seed), device=device,
    )  # fmt: skip
    held = _Heldout(heldout, teachers, weights, batch_size, device)
    with torch.random.fork_rng(devices=_cuda_index(device)):
        torch.manual_seed(settings.seed)  # dropout and any other global randomness
        history, kept, stopped = _train(student, run, held, on_epoch)
    # every rank leaves data-parallel training together (without this barrier, about one
    # two-process gloo run in twenty aborted in a rank's teardown at exit)
    distributed.synchronise()
    recomputed = settings.batchnorm == "train" and has_batchnorm(student)
    if recomputed:
        reset_batchnorm(student, cut_batches(batches(), batch_size), device)
    final = held.score(student, kept, None)
    trained = run.steps * batch_size
    work = {
        "student_training": (1 + BACKWARD_COST) * trained / rows,
        "teachers_training": len(teachers) * trained / rows,
        "heldout": (len(history) + 1 + len(teachers)) * held.size / rows,
        "batchnorm": 1.0 if recomputed else 0.0,
    }
    return DistillReport(
        settings, tuple(history), kept, final, stopped, rows, held.size, run.steps,
        time.perf_counter() - start, {**work, "total": sum(work.values())},
    )  # fmt: skip


def _train(
    student: nn.Module, run: _Run, held: _Heldout, on_epoch
) -> tuple[list[EpochMetrics], int, str]:
    """The epochs; returns the held-out history, the epoch kept and why training stopped.
    The student ends with the kept epoch's weights: the last epoch's for a fixed number
    of epochs, the best one's for "auto" or after a non-finite loss."""
    settings = run.settings
    history = [held.score(student, 0, None)]
    if not math.isfinite(history[0].kl):
        raise NumericalError("the student's held-out outputs are not finite before distillation")
    if on_epoch:
        on_epoch(0, settings.epoch_limit, history[0])
    model = _wrap(student, run.device)
    try:
        return _epochs(model, student, run, held, on_epoch, history)
    finally:
        # the data-parallel wrapper is freed now, while its process group is alive: freed at
        # interpreter exit, after the group, its reducer aborted about one two-process run in eight
        del model
        gc.collect()


def _epochs(
    model: nn.Module,
    student: nn.Module,
    run: _Run,
    held: _Heldout,
    on_epoch,
    history: list[EpochMetrics],
) -> tuple[list[EpochMetrics], int, str]:
    settings = run.settings
    best, best_state = history[0], _snapshot(student)
    optimiser = torch.optim.Adam(
        student.parameters(), lr=settings.lr, weight_decay=settings.weight_decay
    )
    for epoch in range(1, settings.epoch_limit + 1):
        metrics = held.score(student, epoch, _epoch(model, student, optimiser, run))
        history.append(metrics)
        if on_epoch:
            on_epoch(epoch, settings.epoch_limit, metrics)
        if not (math.isfinite(metrics.train_loss) and math.isfinite(metrics.kl)):
            student.load_state_dict(best_state)
            return history, best.epoch, f"non-finite loss in epoch {epoch}"
        if _better(metrics, best):
            best, best_state = metrics, _snapshot(student)
        if settings.auto and epoch - best.epoch >= settings.patience:
            student.load_state_dict(best_state)
            return history, best.epoch, "patience"
    if not settings.auto:
        return history, settings.epoch_limit, "epochs"
    student.load_state_dict(best_state)
    return history, best.epoch, "max_epochs"


def _epoch(model: nn.Module, student: nn.Module, optimiser, run: _Run) -> float:
    """One pass over the training batches; the mean training loss (over every rank)."""
    _train_mode(student, run.settings.batchnorm)
    loss_sum = torch.zeros((), dtype=torch.float64, device=run.device)
    batches = 0
    for x in cut_batches(run.batches(), run.batch_size, run.generator, drop_last=True):
        for group in optimiser.param_groups:
            group["lr"] = _learning_rate(run.steps, run.total_steps, run.settings)
        loss = _loss(model, x.to(run.device), run)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        run.steps += 1
        loss_sum += loss.detach().double()
        batches += 1
    # a rank's loss is its slice's share of the batch's mean loss times the number of
    # ranks: summed over the ranks, the loss sums and batch counts give the mean
    sums = torch.stack([loss_sum.cpu(), torch.tensor(float(batches), dtype=torch.float64)])
    distributed.all_reduce_sum([sums])
    distributed.broadcast_(list(student.buffers()))  # rank 0's running statistics
    return float(sums[0] / sums[1])


def _loss(model: nn.Module, x: torch.Tensor, run: _Run) -> torch.Tensor:
    """The loss of one batch on this rank's slice of it, scaled so that the gradients
    averaged over the ranks are those of the whole batch's mean loss."""
    settings = run.settings
    if settings.augment:
        x = augment_batch(x, settings.augment, settings.crop_padding, run.generator)
    k = distributed.world_size()
    part = x.tensor_split(k)[distributed.rank()]
    target = mean_logits(run.teachers, run.weights, part)
    out = logits_of(model(part)).float()
    logits = logit_rows(out, part)
    total = _DistillationLoss.apply(logits, target, settings.temperature)
    return total * (k / max(_rows_of(x, out), 1))


def _rows_of(x: torch.Tensor, out: torch.Tensor) -> int:
    """How many rows :func:`logit_rows` gives for the whole batch ``x``, of which ``out``
    are the logits of one slice: its samples, or its (real) positions."""
    if out.ndim != 3:
        return x.shape[0]
    positions = real_positions(x)
    return x.shape[0] * out.shape[1] if positions is None else int(positions.sum())
