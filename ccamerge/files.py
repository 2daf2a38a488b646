"""Reading checkpoints and data, writing merged models atomically.

Checkpoints: ``.safetensors``, or ``.pt``/``.pth``/``.bin`` read with
``torch.load(weights_only=True)`` so that no pickled code ever runs. Common
containers (``{"state_dict": ...}``, ``{"model": ...}``) and a ``module.``
prefix are unwrapped.

Data: ``.npz`` (array ``x``, optional ``y``; without ``x``, the only array),
``.npy`` (inputs only), ``.pt`` (a tensor, or a dict with ``x``/``y``),
``.safetensors`` (``x``, optional ``y``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import distributed
from .errors import CheckpointError, DataError, OutputError

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
DATA_SUFFIXES = (".npz", ".npy", ".pt", ".pth", ".safetensors")
_CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "weights")


def _check_readable(path: Path, what: str, error: type[Exception]) -> None:
    if not path.exists():
        raise error(f"{what} {path} does not exist")
    if path.is_dir():
        raise error(f"{what} {path} is a directory, not a file")
    if not os.access(path, os.R_OK):
        raise error(f"{what} {path} is not readable (permission denied)")
    try:  # os.access says yes to root and ignores ACLs: opening is the real test
        with open(path, "rb"):
            pass
    except PermissionError:
        raise error(f"{what} {path} is not readable (permission denied)") from None
    except OSError as e:
        raise error(f"{what} {path} cannot be opened ({e.strerror or e})") from None
    if path.stat().st_size == 0:
        raise error(f"{what} {path} is empty")


def _read_safetensors(path: Path, error: type[Exception], what: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except PermissionError:
        raise error(f"{what} {path} is not readable (permission denied)") from None
    except Exception as e:  # untrusted bytes: any failure (SafetensorError, ...) is the file's
        raise error(f"{what} {path} is not a valid safetensors file ({_first_line(e)})") from None


def _read_torch(path: Path, error: type[Exception], what: str) -> Any:
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": one line on stderr
            warnings.simplefilter("ignore")
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except PermissionError:
        raise error(f"{what} {path} is not readable (permission denied)") from None
    except Exception as e:  # untrusted bytes: a corrupt file can raise anything (AssertionError,
        # struct.error, ...) from torch's readers; all of them mean "not a usable torch file"
        text = str(e)
        if "Weights only load failed" not in text:
            raise error(
                f"{what} {path} cannot be read as a torch file ({_first_line(e)})"
            ) from None
        glob = re.search(r"GLOBAL ([\w.]+)", text)
        if glob:  # a class or function the pickle would import and call
            raise error(
                f"{what} {path} holds Python objects other than tensors (it would import "
                f"{glob.group(1)}); refused to unpickle them (only plain tensors and containers "
                "are loaded)"
            ) from None
        raise error(  # corrupt bytes, or pickle instructions the safe unpickler does not run
            f"{what} {path} cannot be read as a torch file: the safe (weights-only) unpickler "
            f"refused it ({_unpickler_detail(text)})"
        ) from None


def _unpickler_detail(text: str) -> str:
    """What torch's weights-only unpickler stopped at, without its boilerplate."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if "WeightsUnpickler error:" in line:
            rest = line.split("WeightsUnpickler error:", 1)[1].strip()
            if not rest and i + 1 < len(lines):
                rest = lines[i + 1]
            return rest.split(". ")[0].rstrip(".")[:200] or "no detail given"
    return "no detail given"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    if not text:
        return type(e).__name__
    line = text[0] if len(text[0]) <= 160 else text[0].split(". ")[0]  # long: first sentence
    return line[:200]


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    for _ in range(3):
        if isinstance(obj, Mapping) and not _all_tensors(obj):
            inner = next(
                (obj[k] for k in _CONTAINER_KEYS if k in obj and isinstance(obj[k], Mapping)), None
            )
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"checkpoint {path} holds no state dict of tensors")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"checkpoint {path} holds no tensors")
    if len(tensors) != len(obj):
        odd = next(k for k, v in obj.items() if not isinstance(v, torch.Tensor))
        raise CheckpointError(f"checkpoint {path}: entry {odd!r} is not a tensor")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    return tensors


def _all_tensors(obj: Mapping) -> bool:
    return all(isinstance(v, torch.Tensor) for v in obj.values())


def load_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A checkpoint's state dict (CPU tensors, names unwrapped)."""
    path = Path(path)
    _check_readable(path, "checkpoint", CheckpointError)
    if path.suffix == ".safetensors":
        sd = _read_safetensors(path, CheckpointError, "checkpoint")
    elif path.suffix in CHECKPOINT_SUFFIXES:
        sd = _unwrap(_read_torch(path, CheckpointError, "checkpoint"), path)
    else:
        raise CheckpointError(
            f"checkpoint {path}: unknown file type {path.suffix!r} "
            f"(expected one of {', '.join(CHECKPOINT_SUFFIXES)})"
        )
    for name, t in sd.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"checkpoint {path}: tensor {name} has NaN or Inf values")
    return {k: v.contiguous() for k, v in sd.items()}


@dataclass
class Dataset:
    """Model-ready inputs ``x`` (float32) and optional integer labels ``y``."""

    x: torch.Tensor
    y: torch.Tensor | None
    path: str = ""

    def __len__(self) -> int:
        return self.x.shape[0]

    def subset(self, n: int | None, seed: int | None = None) -> Dataset:
        """The first ``n`` samples, or a seeded random ``n`` when ``seed`` is given."""
        if n is None or n >= len(self):
            return self
        if n <= 0:
            raise DataError(f"--num-samples must be positive, got {n}")
        if seed is None:
            idx = torch.arange(n)
        else:
            idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n]
        return Dataset(self.x[idx], None if self.y is None else self.y[idx], self.path)

    def batches(self, batch_size: int):
        for i in range(0, len(self), batch_size):
            yield self.x[i : i + batch_size]


def load_data(path: str | os.PathLike, require_labels: bool = False) -> Dataset:
    path = Path(path)
    _check_readable(path, "data file", DataError)
    suffix = path.suffix
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as f:
                arrays = {k: f[k] for k in f.files}
        except Exception as e:  # untrusted bytes: BadZipFile, ValueError, TokenError, ...
            raise DataError(f"data file {path} is not a valid .npz ({_first_line(e)})") from None
        x, y = _pick_xy(arrays, path)
    elif suffix == ".npy":
        try:
            x, y = np.load(path, allow_pickle=False), None
        except Exception as e:  # untrusted bytes: ValueError, TokenError, ...
            raise DataError(f"data file {path} is not a valid .npy ({_first_line(e)})") from None
    elif suffix in (".pt", ".pth"):
        obj = _read_torch(path, DataError, "data file")
        if isinstance(obj, torch.Tensor):
            x, y = obj, None
        elif isinstance(obj, Mapping):
            x, y = _pick_xy(dict(obj), path)
        else:
            raise DataError(f"data file {path} holds neither a tensor nor a dict with 'x'")
    elif suffix == ".safetensors":
        x, y = _pick_xy(_read_safetensors(path, DataError, "data file"), path)
    else:
        raise DataError(
            f"data file {path}: unknown file type {suffix!r} "
            f"(expected one of {', '.join(DATA_SUFFIXES)})"
        )
    return _as_dataset(x, y, path, require_labels)


def _pick_xy(arrays: Mapping[str, Any], path: Path) -> tuple[Any, Any]:
    if "x" in arrays:
        return arrays["x"], arrays.get("y")
    if len(arrays) == 1:
        return next(iter(arrays.values())), None
    raise DataError(
        f"data file {path} has several arrays ({', '.join(sorted(arrays))}) and none is named 'x'"
    )


def _tensor(a: Any, path: Path, what: str) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a
    a = np.asarray(a)
    if a.dtype.kind not in "biuf":  # strings, objects, records, complex: no numbers to feed
        raise DataError(f"data file {path}: {what} have unsupported dtype {a.dtype}")
    return torch.as_tensor(a)


def _as_dataset(x: Any, y: Any, path: Path, require_labels: bool) -> Dataset:
    x = _tensor(x, path, "inputs")
    if x.ndim < 2 or x.shape[0] == 0:
        raise DataError(
            f"data file {path}: inputs of shape {tuple(x.shape)}; expected (samples, ...)"
        )
    if not (
        x.is_floating_point()
        or x.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
    ):
        raise DataError(f"data file {path}: inputs have unsupported dtype {x.dtype}")
    x = x.to(torch.float32).contiguous()
    if not torch.isfinite(x).all():
        raise DataError(f"data file {path}: inputs contain NaN or Inf")
    if y is not None:
        y = _tensor(y, path, "labels 'y'")
        if y.is_complex():
            raise DataError(f"data file {path}: labels 'y' have unsupported dtype {y.dtype}")
        if y.is_floating_point():
            if not torch.isfinite(y).all() or not torch.equal(y, y.round()):
                raise DataError(f"data file {path}: labels 'y' are not integers")
        y = y.reshape(-1).to(torch.int64) if y.ndim <= 1 else y
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise DataError(f"data file {path}: {tuple(y.shape)} labels for {x.shape[0]} samples")
    elif require_labels:
        raise DataError(f"data file {path} has no labels 'y' (needed for evaluation)")
    return Dataset(x, y, str(path))


def sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_output_path(output: str | os.PathLike, inputs: list[str], force: bool) -> Path:
    """Refuse outputs that would clobber an input, an existing file (without force), or
    land in a missing directory. Called before any work starts."""
    out = Path(output)
    if out.suffix != ".safetensors":
        raise OutputError(f"output {out} must end in .safetensors")
    if not out.parent.exists():
        raise OutputError(f"output directory {out.parent} does not exist")
    if not out.parent.is_dir():
        raise OutputError(f"output directory {out.parent} is not a directory")
    if out.is_dir():
        raise OutputError(f"output {out} is a directory")
    resolved = out.resolve()
    for p in inputs:
        if Path(p).resolve() == resolved or _same_file(Path(p), out):
            raise OutputError(f"output {out} is also an input; choose another path")
    if out.exists() and not force:
        raise OutputError(f"output {out} exists; pass --force to overwrite it")
    if not os.access(out.parent, os.W_OK):
        raise OutputError(f"output directory {out.parent} is not writable")
    return out


def _same_file(a: Path, b: Path) -> bool:
    """True for two names of one file (hard links included)."""
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def safetensors_bytes(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> tuple[bytes, memoryview]:
    """A safetensors file as (header, data): ``safetensors.torch.save`` with the JSON
    header re-serialised with sorted keys. safetensors writes its header from hash maps
    whose order changes from process to process; sorting makes the same tensors and
    metadata give the same bytes every time. The header stays 8-byte aligned."""
    from safetensors.torch import save

    raw = save(dict(tensors), metadata=dict(metadata))
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    blob = text.encode()
    blob += b" " * (-len(blob) % 8)
    return len(blob).to_bytes(8, "little") + blob, memoryview(raw)[8 + n :]


def write_atomic(path: str | os.PathLike, *chunks: bytes) -> None:
    """Write ``chunks`` to a temporary file in the target's directory, fsync, then rename.

    On any failure or interruption the temporary file is removed and the target is
    untouched; an OSError becomes :class:`OutputError`. Under distribution every rank
    calls this; once all have (a rank that failed ends the others), rank 0 alone writes."""
    distributed.synchronise()
    if not distributed.is_main():
        return
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)  # mkstemp makes the file 0600; give it the usual mode
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        if isinstance(e, OSError):
            raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
        raise


def save_safetensors_atomic(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, Any]
) -> None:
    """Write a safetensors file atomically (:func:`write_atomic`).

    Metadata values that are not strings are stored as JSON strings. The bytes are
    deterministic (see :func:`safetensors_bytes`)."""
    meta = {
        k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in metadata.items()
    }
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    write_atomic(path, *safetensors_bytes(tensors, meta))


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})
