"""Data-parallel calibration passes under ``torchrun``, on PyTorch's ``torch.distributed``.

Everything a merge learns from data is a sum over calibration batches (joint
statistics, BatchNorm statistics, model outputs scored on held-out data), and a
sum splits across processes exactly. Launched as
``torchrun --nproc-per-node K -m ccamerge merge ...``, every process (rank)
runs the same merge: it reads its share of the batches (batch i goes to rank
i mod K, :func:`shard`), its sums are added across ranks in float64 and in
rank order (:func:`all_reduce_sum`, the same bits on every rank), and
alignment and solves then run identically on every rank. Only rank 0 writes
files and prints (``ccamerge.io.files.write_atomic`` and the CLI's output check
:func:`is_main`). A worker ends through :func:`exit_worker`, which leaves the group
and skips the interpreter's teardown (where gloo's threads can abort a finished rank).

:func:`setup` joins the process group from torchrun's environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``): gloo for a
CPU run; for ``--device cuda``, rank r computes on ``cuda:LOCAL_RANK`` and
tensors on the GPU go through NCCL (CPU tensors through gloo). Without that
environment nothing happens: no process group, and every function here
answers for one process at no cost.

Failures: a rank that fails records the fact in torchrun's key-value store
(:func:`claim_failure`); the first to record it prints the one-line error, the
others print nothing and exit with the first one's status. The failed rank exits; the others are ended at their
next collective (gloo raises as soon as a peer's connections close) or by
torchrun, which stops the remaining workers when one fails (SIGTERM, turned
into an exception here so that temporary files are removed). Files are written
only after every rank has reached the write (:func:`synchronise`), so a failed
run leaves none. A rank that hangs without dying is found only by the process
group's timeout (PyTorch's default: 30 minutes for gloo, 10 for NCCL).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import timedelta
from typing import Any, NoReturn, TypeVar

import torch
import torch.distributed as dist

from .errors import OptionError

T = TypeVar("T")

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
CHUNK = 1 << 21  # float64 values gathered per collective in all_reduce_sum (16 MiB)
_FAILED_KEY = "ccamerge/failed-rank"
_state: dict[str, Any] = {"store": None}


def launched() -> bool:
    """True in a process started by torchrun (its environment is set)."""
    return all(k in os.environ for k in TORCHRUN_ENV)


def setup(device: str) -> str:
    """Join torchrun's process group (once per process) and return this rank's device:
    ``cuda`` becomes ``cuda:LOCAL_RANK``. Without torchrun: ``device`` unchanged."""
    if not launched():
        return device
    if device == "cuda":
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    if device.startswith("cuda"):
        index = torch.device(device).index or 0
        if index >= torch.cuda.device_count():
            raise OptionError(
                f"rank {os.environ['RANK']} needs {device} but this machine has "
                f"{torch.cuda.device_count()} GPU(s); start at most that many processes per node"
            )
        torch.cuda.set_device(index)
    if not dist.is_initialized():
        dist.init_process_group("cpu:gloo,cuda:nccl" if device.startswith("cuda") else "gloo")
        _state["store"] = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=timedelta(seconds=10),
        )
        signal.signal(signal.SIGTERM, _interrupt)
    return device


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # torchrun stopping this worker: clean up like Ctrl-C


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0 (and in a run of one process): the one that writes and prints."""
    return rank() == 0


def shard(batches: Iterable[T], after_first: Callable[[], None] | None = None) -> Iterator[T]:
    """This rank's share of ``batches``: batch i when ``i % world_size() == rank()``.

    ``after_first`` (a collective, such as sharing what batch 0 set up) runs once on
    every rank: on rank 0 after the caller has processed batch 0 (when it asks for the
    next batch), on the others before their first batch. Without distribution:
    ``batches`` as they are, and ``after_first`` is never called."""
    if not is_distributed():
        yield from batches
        return
    me, k = rank(), world_size()
    pending = after_first
    for i, x in enumerate(batches):
        if i % k != me:
            continue
        if pending is not None and i > 0:
            pending()
            pending = None
        yield x
    if pending is not None:
        pending()


def unshard(items: list[T]) -> list[T]:
    """Every rank's :func:`shard` results in the order of the batches they came from
    (picklable items, e.g. CPU tensors), on every rank."""
    if not is_distributed():
        return items
    per_rank: list[Any] = [None] * world_size()
    dist.all_gather_object(per_rank, items)
    total = sum(len(p) for p in per_rank)
    k = world_size()
    return [per_rank[i % k][i // k] for i in range(total)]


def all_reduce_sum(tensors: Sequence[torch.Tensor]) -> None:
    """Replace each float64 tensor by its sum over the ranks, added in rank order
    (``((x_0 + x_1) + x_2) + ...``): the same bits on every rank and in every run.

    Tensors must be contiguous; they are gathered in pieces of at most ``CHUNK``
    values (so memory grows by ``world_size() * CHUNK`` values, not by the tensors'
    size). Without distribution: nothing."""
    if not is_distributed():
        return
    for t in tensors:
        if t.dtype != torch.float64 or not t.is_contiguous():
            raise TypeError("all_reduce_sum takes contiguous float64 tensors")
    pieces = [t.view(-1)[i : i + CHUNK] for t in tensors for i in range(0, t.numel(), CHUNK)]
    bucket: list[torch.Tensor] = []
    for piece in pieces:
        if bucket and (
            sum(p.numel() for p in bucket) + piece.numel() > CHUNK
            or piece.device != bucket[0].device
        ):
            _sum_in_place(bucket)
            bucket = []
        bucket.append(piece)
    if bucket:
        _sum_in_place(bucket)


def _sum_in_place(views: list[torch.Tensor]) -> None:
    flat = torch.cat(views)
    parts = [torch.empty_like(flat) for _ in range(world_size())]
    dist.all_gather(parts, flat)
    total = parts[0]
    for p in parts[1:]:
        total += p
    for v, part in zip(views, total.split([v.numel() for v in views])):
        v.copy_(part)


def broadcast_(tensors: Sequence[torch.Tensor], src: int = 0) -> None:
    """Overwrite each tensor with rank ``src``'s (in place). Without distribution: nothing."""
    if is_distributed():
        for t in tensors:
            dist.broadcast(t, src)


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` (picklable) on every rank. Without distribution: ``obj``."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


def synchronise() -> None:
    """Return once every rank has arrived here (a rank that failed ends the others)."""
    if is_distributed():
        dist.barrier()


def claim_failure(code: int) -> int | None:
    """Record that this rank failed with exit status ``code``. None when it is the first
    rank to fail, which alone reports the error; otherwise the status of the rank that
    failed first (whose failure most likely ended this one), for this rank to exit with.
    Without distribution: None."""
    store = _state["store"]
    if store is None or not is_distributed():
        return None
    mine = f"{rank()} {code}"
    try:
        first = store.compare_set(_FAILED_KEY, "", mine).decode()
    except Exception:  # the store is gone with torchrun: report rather than stay silent
        return None
    return None if first == mine else int(first.split()[1])


def shutdown() -> None:
    """Leave the process group (the end of a run); nothing without distribution."""
    if is_distributed():
        try:
            dist.destroy_process_group()
        except Exception:  # a broken group (a peer failed) cannot be left more cleanly
            pass
        _state["store"] = None


def exit_worker(code: int) -> NoReturn:
    """End a process that joined torchrun's group with exit status ``code``: leave the
    group, flush stdout and stderr, and exit at once, skipping the interpreter's
    teardown. Gloo's threads can outlive the group there and abort the process: once,
    in CI, a rank that had finished a two-process distillation died with "terminate
    called without an active exception" and torchrun reported the run as failed (not
    seen in 67 runs on a quiet machine). Every file is written and closed before this
    is called; nothing registered with :mod:`atexit` is needed by a worker."""
    shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing left to say
            pass
    os._exit(code)
