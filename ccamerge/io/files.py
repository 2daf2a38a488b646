"""Reading checkpoints and data; writing merged models atomically, behind one guard.

Checkpoints: ``.safetensors``, or ``.pt``/``.pth``/``.bin``/``.ckpt`` read with
``torch.load(weights_only=True)`` so that no pickled code ever runs; a Hugging
Face-style folder or a sharded set's ``*.index.json``. Common containers
(``{"state_dict": ...}``, ``{"model": ...}``, ...) and a ``module.`` prefix are
unwrapped; non-tensor entries are left out. (Other prefixes and stray tensors are
the load step's business: it knows which names form a model.)

Data: ``.npz`` (array ``x``, optional ``y``; without ``x``, the only array),
``.npy`` (inputs only), ``.pt`` (a tensor, or a dict with ``x``/``y``),
``.safetensors`` (``x``, optional ``y``); ``-`` reads standard input.

Outputs: :func:`check_outputs` (never an input, never two outputs on one path, never
an existing file without force), then :func:`save_checkpoint_atomic` (.safetensors,
.pt/.pth/.bin, a folder) or ``-o -`` (:func:`write_stdout`). Strict JSON everywhere
(:func:`json_text`).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..runtime import distributed
from ..runtime.errors import (
    CheckpointError,
    DataError,
    NumericalError,
    OptionError,
    OutputError,
)
from .padding import PAD

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
OUTPUT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", "/")  # a merged model; "/": a folder
SHARD_BYTES = 5 * 10**9  # a folder output above this size is written as shards with an index
DATA_SUFFIXES = (".npz", ".npy", ".pt", ".pth", ".safetensors")
MAX_NORMALISED = 50.0  # inputs beyond this magnitude look unnormalised (a warning)
_CONTAINER_KEYS = (
    "state_dict",
    "model_state_dict",
    "model",
    "module",
    "net",
    "network",
    "weights",
    "params",
)


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
    # non-tensor entries (an epoch number, optimizer state, hyperparameters) are not the model
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        entries = ", ".join(f"{k} ({_count_tensors(v)} tensors)" for k, v in list(obj.items())[:8])
        raise CheckpointError(
            f"checkpoint {path} holds no state dict of tensors at its top level or under "
            f"{', '.join(_CONTAINER_KEYS)}; its top-level entries: {entries}"
            + (f" and {len(obj) - 8} more" if len(obj) > 8 else "")
        )
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    return tensors


def _count_tensors(obj: Any) -> int:
    """Tensors anywhere inside ``obj`` (nested dicts, lists, tuples)."""
    if isinstance(obj, torch.Tensor):
        return 1
    if isinstance(obj, Mapping):
        return sum(_count_tensors(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_count_tensors(v) for v in obj)
    return 0


def _all_tensors(obj: Mapping) -> bool:
    return all(isinstance(v, torch.Tensor) for v in obj.values())


def load_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A checkpoint's state dict (CPU tensors, names unwrapped): one file, a Hugging
    Face-style folder (:data:`FOLDER_FILES`), or a sharded set named by its
    ``*.index.json`` (its ``weight_map`` names each tensor's shard)."""
    files = checkpoint_files(path)
    if files[0].name.endswith(INDEX_SUFFIX):
        sd = _read_shards(files[0], files[1:])
    else:
        sd = _read_checkpoint_file(files[0])
    return checked_checkpoint(sd, path)


def checked_checkpoint(sd: Mapping[str, torch.Tensor], path: str | os.PathLike):
    """``sd`` with contiguous tensors, refused when one holds NaN or Inf values."""
    for name, t in sd.items():
        if t.is_floating_point() and not torch.isfinite(t.float()).all():
            raise CheckpointError(f"checkpoint {path}: tensor {name} has NaN or Inf values")
    return {k: v.contiguous() for k, v in sd.items()}


INDEX_SUFFIX = ".index.json"
FOLDER_FILES = (  # what a Hugging Face-style checkpoint folder holds, in order of preference
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def checkpoint_files(path: str | os.PathLike) -> list[Path]:
    """The files a checkpoint is read from: the file itself; for a folder, the first of
    :data:`FOLDER_FILES` it holds (a sharded one with its shards); for an index, the
    index then its shards (in the folder of the index, sorted)."""
    path = Path(path)
    if path.is_dir():
        found = next((path / n for n in FOLDER_FILES if (path / n).is_file()), None)
        if found is None:
            raise CheckpointError(
                f"checkpoint folder {path} holds none of {', '.join(FOLDER_FILES)}"
            )
        path = found
    _check_readable(path, "checkpoint", CheckpointError)
    if not path.name.endswith(INDEX_SUFFIX):
        return [path]
    return [path, *(path.parent / name for name in sorted(set(_weight_map(path).values())))]


def _weight_map(index: Path) -> dict[str, str]:
    """An index's ``weight_map`` (tensor name -> shard file in the index's folder)."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"checkpoint index {index} is not a JSON object with a 'weight_map' ({_first_line(e)})"
        ) from None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and Path(v).name == v and v not in ("", "..")
        for k, v in weight_map.items()
    ):
        raise CheckpointError(
            f"checkpoint index {index}: 'weight_map' must map tensor names to shard file "
            "names in the index's folder"
        )
    return weight_map


def _read_checkpoint_file(path: Path) -> dict[str, torch.Tensor]:
    _check_readable(path, "checkpoint", CheckpointError)
    if path.suffix == ".safetensors":
        return _read_safetensors(path, CheckpointError, "checkpoint")
    if path.suffix in CHECKPOINT_SUFFIXES:
        return _unwrap(_read_torch(path, CheckpointError, "checkpoint"), path)
    raise CheckpointError(
        f"checkpoint {path}: unknown file type {path.suffix!r} "
        f"(expected one of {', '.join(CHECKPOINT_SUFFIXES)}, a folder or an {INDEX_SUFFIX})"
    )


def _read_shards(index: Path, shards: list[Path]) -> dict[str, torch.Tensor]:
    """The tensors of a sharded checkpoint: each one from the shard the index names."""
    weight_map = _weight_map(index)
    sd: dict[str, torch.Tensor] = {}
    for shard in shards:
        tensors = _read_checkpoint_file(shard)
        for name in (n for n, f in weight_map.items() if f == shard.name):
            if name not in tensors:
                raise CheckpointError(
                    f"checkpoint shard {shard} lacks {name}, which {index} puts there"
                )
            sd[name] = tensors[name]
    return sd


@dataclass
class Dataset:
    """Model-ready inputs ``x`` (float32, or int64 token ids: ``tokens``) and optional
    integer labels ``y``."""

    x: torch.Tensor
    y: torch.Tensor | None
    path: str = ""
    file_dtype: str = "float32"  # the inputs' dtype in the file, before the cast to float32
    tokens: bool = False  # integer token ids (a file's "input_ids"), fed as int64

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
        return self.take(idx)

    def take(self, idx: torch.Tensor) -> Dataset:
        """The samples at ``idx`` (with their labels)."""
        y = None if self.y is None else self.y[idx]
        return Dataset(self.x[idx], y, self.path, self.file_dtype, self.tokens)

    def scale_warning(self, what: str) -> str | None:
        """A warning when the inputs look unnormalised: integers in the file (e.g. uint8
        pixels 0..255) or values beyond :data:`MAX_NORMALISED` in magnitude; never for
        token ids."""
        if self.tokens:
            return None
        peak = float(self.x.abs().max())
        if self.file_dtype.startswith(("int", "uint")):
            why = f"integer dtype {self.file_dtype}, values up to {peak:g}"
        elif peak > MAX_NORMALISED:
            why = f"values up to {peak:g} in magnitude"
        else:
            return None
        return (
            f"{what} {self.path}: the inputs look unnormalised ({why}); they are fed to the "
            "models as they are: normalise them as in training (e.g. pixels / 255, then the "
            "training mean and std)"
        )

    def batches(self, batch_size: int):
        for i in range(0, len(self), batch_size):
            yield self.x[i : i + batch_size]


STREAM = "-"  # --data - reads standard input; -o - writes standard output


def check_stdin_once(inputs: Sequence[tuple[str, str | os.PathLike | None]]) -> None:
    """Refuse a run that names standard input (``-``) for more than one input, before
    anything is read: it can be read once. ``inputs``: ``(what, path or None)`` of every
    input of the run, e.g. ``("--data", "-")``, ``("checkpoint 1", "b.pt")``."""
    named = [what for what, path in inputs if path is not None and str(path) == STREAM]
    if len(named) > 1:
        given = f"{', '.join(named[:-1])} and {named[-1]}"
        raise OptionError(f"- (standard input) can be read only once, but it is given for {given}")


def load_data(path: str | os.PathLike, require_labels: bool = False) -> Dataset:
    """Inputs (and labels) from a data file, or from standard input when ``path`` is ``-``."""
    if str(path) == STREAM:
        return _load_stdin_data(require_labels)
    path = Path(path)
    _check_readable(path, "data file", DataError)
    suffix = path.suffix
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as f:
                arrays = {k: f[k] for k in f.files}
        except Exception as e:  # untrusted bytes: BadZipFile, ValueError, TokenError, ...
            raise DataError(f"data file {path} is not a valid .npz ({_first_line(e)})") from None
    elif suffix == ".npy":
        try:
            arrays = {"x": np.load(path, allow_pickle=False)}
        except Exception as e:  # untrusted bytes: ValueError, TokenError, ...
            raise DataError(f"data file {path} is not a valid .npy ({_first_line(e)})") from None
    elif suffix in (".pt", ".pth"):
        obj = _read_torch(path, DataError, "data file")
        if isinstance(obj, torch.Tensor):
            arrays = {"x": obj}
        elif isinstance(obj, Mapping):
            arrays = dict(obj)
        else:
            raise DataError(f"data file {path} holds neither a tensor nor a dict with 'x'")
    elif suffix == ".safetensors":
        arrays = _read_safetensors(path, DataError, "data file")
    else:
        raise DataError(
            f"data file {path}: unknown file type {suffix!r} "
            f"(expected one of {', '.join(DATA_SUFFIXES)})"
        )
    return _as_dataset(arrays, path, require_labels)


STREAM_ROWS = 4096  # samples a streamed source yields at a time


@dataclass
class DataStream:
    """Unlabelled inputs read afresh, chunk by chunk, on every pass (``chunks()``): a
    ``.npy`` file memory-mapped (any size: only one chunk is in memory), a folder of data
    files read one after the other (sorted by name), or any other data file read whole.
    Every chunk is checked (finite, one sample shape) and given as float32."""

    path: str
    files: list[Path]
    samples: int
    sample_shape: tuple[int, ...]

    def chunks(self) -> Iterator[torch.Tensor]:
        for file in self.files:
            for x in _file_chunks(file):
                if tuple(x.shape[1:]) != self.sample_shape:
                    raise DataError(
                        f"data {file}: samples of shape {tuple(x.shape[1:])}, expected "
                        f"{self.sample_shape} as in {self.files[0]}"
                    )
                if not torch.isfinite(x).all():
                    raise DataError(f"data {file}: inputs contain NaN or Inf")
                yield x


def open_stream(path: str | os.PathLike) -> DataStream:
    """A :class:`DataStream` over ``path`` (a data file or a folder of them), after one pass
    that counts the samples and checks every chunk."""
    if str(path) == STREAM:
        raise DataError("streamed data cannot come from standard input; give a file or folder")
    root = Path(path)
    if root.is_dir():
        files = sorted(f for f in root.iterdir() if f.suffix in DATA_SUFFIXES and f.is_file())
        if not files:
            raise DataError(f"data folder {root} holds no data files ({', '.join(DATA_SUFFIXES)})")
    else:
        _check_readable(root, "data file", DataError)
        files = [root]
    first = next(_file_chunks(files[0]))
    stream = DataStream(str(root), files, 0, tuple(first.shape[1:]))
    stream.samples = sum(x.shape[0] for x in stream.chunks())
    return stream


def _file_chunks(path: Path) -> Iterator[torch.Tensor]:
    """One file's inputs in chunks of :data:`STREAM_ROWS` samples (a ``.npy`` memory-mapped)."""
    if path.suffix != ".npy":
        x = load_data(path).x
        yield from x.split(STREAM_ROWS)
        return
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:  # untrusted bytes
        raise DataError(f"data file {path} is not a valid .npy ({_first_line(e)})") from None
    if array.ndim < 2 or array.shape[0] == 0:
        raise DataError(f"data file {path}: inputs of shape {array.shape}; expected (samples, ...)")
    for i in range(0, array.shape[0], STREAM_ROWS):
        chunk = np.asarray(array[i : i + STREAM_ROWS])
        if not (np.issubdtype(chunk.dtype, np.floating) or np.issubdtype(chunk.dtype, np.integer)):
            raise DataError(f"data file {path}: inputs have unsupported dtype {chunk.dtype}")
        yield torch.from_numpy(chunk.astype(np.float32))


def _load_stdin_data(require_labels: bool) -> Dataset:
    """Standard input, its format told by its first bytes, read through a temporary file
    (the readers take paths); messages name standard input, not the temporary file."""
    raw = sys.stdin.buffer.read()
    if not raw:
        raise DataError("data file - (standard input) is empty")
    with tempfile.TemporaryDirectory(prefix="ccamerge-stdin-") as folder:
        tmp = Path(folder) / f"stdin{_data_suffix(raw)}"
        tmp.write_bytes(raw)
        try:
            data = load_data(tmp, require_labels)
        except DataError as e:
            raise DataError(str(e).replace(str(tmp), "- (standard input)")) from None
    data.path = STREAM
    return data


def _data_suffix(raw: bytes) -> str:
    """The data file type of ``raw`` from its magic bytes."""
    if raw.startswith(b"\x93NUMPY"):
        return ".npy"
    if raw.startswith(b"PK"):  # a zip: .npz holds .npy members, a torch file does not
        try:
            with zipfile.ZipFile(io.BytesIO(raw)) as archive:
                names = archive.namelist()
        except zipfile.BadZipFile:
            return ".npz"
        return ".npz" if names and all(n.endswith(".npy") for n in names) else ".pt"
    if raw[8:9] == b"{":  # 8-byte header length, then the JSON header
        return ".safetensors"
    return ".pt"  # a legacy torch pickle


def _pick_xy(arrays: Mapping[str, Any], path: Path) -> tuple[Any, Any]:
    """The inputs and labels of a file's arrays: ``x`` and ``y``, or its only array."""
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


def _token_ids(arrays: Mapping[str, Any], path: Path) -> torch.Tensor:
    """``input_ids`` as int64 (integers >= 0), with the padded positions of an
    ``attention_mask`` beside them (0: padding, 1: a token) set to :data:`PAD`."""
    ids = _tensor(arrays["input_ids"], path, "input_ids")
    if ids.is_floating_point() or ids.dtype == torch.bool:
        raise DataError(f"data file {path}: input_ids have dtype {ids.dtype}, not integers")
    if ids.numel() and int(ids.min()) < 0:
        raise DataError(f"data file {path}: input_ids hold negative token ids")
    ids = ids.to(torch.int64)
    mask = arrays.get("attention_mask")
    if mask is None:
        return ids
    mask = _tensor(mask, path, "attention_mask")
    if mask.shape != ids.shape:
        raise DataError(
            f"data file {path}: attention_mask of shape {tuple(mask.shape)} for input_ids "
            f"of shape {tuple(ids.shape)}"
        )
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise DataError(f"data file {path}: attention_mask holds values other than 0 and 1")
    if ids.ndim != 2 and not bool((mask == 1).all()):
        raise DataError(
            f"data file {path}: padding is read for input_ids of shape (samples, length), "
            f"not {tuple(ids.shape)}"
        )
    return ids.masked_fill(mask == 0, PAD)


def _as_dataset(arrays: Mapping[str, Any], path: Path, require_labels: bool) -> Dataset:
    """A file's arrays as a :class:`Dataset`: ``input_ids`` (token ids, kept integer) or
    ``x`` (cast to float32), and labels ``y``."""
    tokens = "input_ids" in arrays and "x" not in arrays
    if tokens:
        x, y = _token_ids(arrays, path), arrays.get("y")
    else:
        x, y = _pick_xy(arrays, path)
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
    file_dtype = str(x.dtype).removeprefix("torch.")
    x = x.contiguous() if tokens else x.to(torch.float32).contiguous()
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
    elif require_labels and not tokens:  # token ids without labels: next-token prediction
        raise DataError(f"data file {path} has no labels 'y' (needed for evaluation)")
    return Dataset(x, y, str(path), file_dtype, tokens)


def sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file; of a checkpoint folder or index, of its files one after the
    other (:func:`checkpoint_files`)."""
    h = hashlib.sha256()
    several = Path(path).is_dir() or str(path).endswith(INDEX_SUFFIX)
    for part in checkpoint_files(path) if several else [Path(path)]:
        with open(part, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def check_output_path(
    output: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    force: bool,
    option: str = "output",
    suffixes: Sequence[str] | None = (".safetensors",),
) -> Path:
    """Refuse an output that would clobber an input of the run (checkpoints, data,
    transforms, spec), an existing file (without force), that lands in a missing
    directory, or whose type (``suffixes``; None: any) is wrong. Called before any work
    and again right before writing. With ``"/"`` among the suffixes the output may be a
    folder (a path ending in ``/``, or an existing folder): each file a folder output
    writes (:func:`folder_output_files`) passes the same checks."""
    out = Path(output)
    if suffixes and "/" in suffixes and is_folder(output):
        if out.exists() and not out.is_dir():
            raise OutputError(f"{option} {out} is a file, not a folder")
        if not out.parent.is_dir():
            raise OutputError(f"{option} directory {out.parent} does not exist")
        for name in folder_output_files(out) if out.is_dir() else []:
            check_output_path(out / name, inputs, force, option, None)
        return out
    if suffixes and out.suffix.lower() not in suffixes:
        kinds = suffixes[0] if len(suffixes) == 1 else f"one of {', '.join(suffixes)}"
        raise OutputError(f"{option} {out} must end in {kinds}")
    if not out.parent.exists():
        raise OutputError(f"{option} directory {out.parent} does not exist")
    if not out.parent.is_dir():
        raise OutputError(f"{option} directory {out.parent} is not a directory")
    if out.is_dir():
        raise OutputError(f"{option} {out} is a directory")
    for p in inputs:
        named = checkpoint_files(p) if Path(p).is_dir() else [Path(p)]
        if any(_same_path(q, out) for q in named):
            raise OutputError(f"{option} {out} is also an input; choose another path")
    if out.exists() and not force:
        raise OutputError(f"{option} {out} exists; pass --force to overwrite it")
    if not os.access(out.parent, os.W_OK):
        raise OutputError(f"{option} directory {out.parent} is not writable")
    return out


def is_folder(output: str | os.PathLike) -> bool:
    """An output named as a folder: ``DIR/`` (a folder named without the slash is refused,
    so that a mistyped ``-o`` never fills a folder)."""
    return str(output).endswith(("/", os.sep))


def folder_output_files(folder: Path) -> list[str]:
    """The files a folder output may write: the model (one file, or shards with an index),
    the first input's config.json, and shards of an earlier write that are there."""
    fixed = ["model.safetensors", "model.safetensors.index.json", "config.json"]
    earlier = (
        sorted(p.name for p in folder.glob("model-*-of-*.safetensors")) if folder.is_dir() else []
    )
    return fixed + earlier


def check_outputs(
    outputs: Sequence[tuple[str, str | os.PathLike | None, Sequence[str] | None]],
    inputs: Sequence[str | os.PathLike],
    force: bool,
) -> list[Path | None]:
    """:func:`check_output_path` for every ``(option, path or None, suffixes)`` of one
    command, and no two of them on one file. Returns the paths (None where not given)."""
    checked: list[Path | None] = []
    claimed: list[tuple[str, Path]] = []
    for option, path, suffixes in outputs:
        if path is None:
            checked.append(None)
            continue
        out = check_output_path(path, inputs, force, option, suffixes)
        for other_option, other in claimed:
            if _same_path(other, out):
                raise OutputError(f"{other_option} and {option} name the same file {out}")
        claimed.append((option, out))
        checked.append(out)
    return checked


def _same_path(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve() or _same_file(a, b)


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


def strict_json(obj: Any) -> Any:
    """``obj`` as plain JSON values, every NaN or infinity replaced by None (null): strict
    JSON has no NaN or Infinity. Arrays and tensors become lists, paths strings."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    if hasattr(obj, "tolist"):
        return strict_json(obj.tolist())
    if hasattr(obj, "__fspath__"):
        return os.fspath(obj)
    return obj


def json_text(obj: Any, **options: Any) -> str:
    """Strict JSON (:func:`strict_json`; never ``NaN`` or ``Infinity``)."""
    return json.dumps(strict_json(obj), allow_nan=False, **options)


def check_finite(tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """Refuse tensors with NaN or Inf values, naming the first one."""
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t.float()).all():
            raise NumericalError(
                f"{what}: tensor {name} has NaN or Inf values; nothing was written"
            )


def save_safetensors_atomic(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, Any]
) -> None:
    """Write a safetensors file atomically (:func:`write_atomic`), refusing non-finite
    tensors (:func:`check_finite`).

    Metadata values that are not strings are stored as JSON strings. The bytes are
    deterministic (see :func:`safetensors_bytes`)."""
    write_atomic(path, *safetensors_file(tensors, metadata, f"output {path}"))


def safetensors_file(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any], what: str
) -> tuple[bytes, memoryview]:
    """The bytes of a safetensors file (:func:`safetensors_bytes`), non-finite tensors
    refused; metadata values that are not strings become JSON strings."""
    check_finite(tensors, what)
    meta = {
        k: v if isinstance(v, str) else json_text(v, sort_keys=True) for k, v in metadata.items()
    }
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    return safetensors_bytes(tensors, meta)


def check_stdout() -> None:
    """``-o -`` needs standard output to be a file or a pipe, not a terminal."""
    if sys.stdout.isatty():
        raise OutputError(
            "-o - writes binary data on standard output; redirect it to a file or pipe"
        )


def write_stdout(chunks: Sequence[bytes | memoryview]) -> None:
    """Binary output on standard output (``-o -``; rank 0 alone under torchrun)."""
    if not distributed.is_main():
        return
    check_stdout()
    for chunk in chunks:
        sys.stdout.buffer.write(chunk)
    sys.stdout.buffer.flush()


def save_checkpoint_atomic(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: Mapping[str, Any],
    config: Path | None = None,
) -> None:
    """Write a merged model by its suffix (:data:`OUTPUT_SUFFIXES`): ``.safetensors`` with
    ``metadata`` (:func:`save_safetensors_atomic`); ``.pt``/``.pth``/``.bin`` as a plain
    state dict of tensors (``torch.load(weights_only=True)`` reads it; no metadata); a
    folder as :func:`save_folder` (with a copy of ``config``). The same guarantees
    everywhere: atomic files, never a non-finite tensor."""
    if is_folder(path):
        save_folder(tensors, Path(path), metadata, config)
        return
    if Path(path).suffix.lower() == ".safetensors":
        save_safetensors_atomic(tensors, path, metadata)
        return
    check_finite(tensors, f"output {path}")
    buffer = io.BytesIO()
    torch.save({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, buffer)
    write_atomic(path, buffer.getvalue())


def save_folder(
    tensors: Mapping[str, torch.Tensor],
    folder: Path,
    metadata: Mapping[str, Any],
    config: Path | None = None,
) -> None:
    """A Hugging Face-style folder: ``model.safetensors``, or above :data:`SHARD_BYTES`
    shards ``model-0000k-of-0000n.safetensors`` (tensors in name order, each shard at most
    the threshold unless one tensor alone is larger) with ``model.safetensors.index.json``;
    and a copy of ``config`` as ``config.json``. Each file is written atomically, the
    index last; shards of an earlier write that the new index does not name are removed."""
    check_finite(tensors, f"output {folder}")
    folder.mkdir(exist_ok=True)
    shards: list[list[str]] = [[]]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    if config is not None:
        write_atomic(folder / "config.json", config.read_bytes())
    if len(shards) == 1:
        save_safetensors_atomic(tensors, folder / "model.safetensors", metadata)
        written = {"model.safetensors"}
    else:
        files = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
        for names, file in zip(shards, files):
            save_safetensors_atomic({n: tensors[n] for n in names}, folder / file, metadata)
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {
            "metadata": {"total_size": total},
            "weight_map": {n: file for names, file in zip(shards, files) for n in names},
        }
        write_atomic(folder / FOLDER_FILES[1], json_text(index, indent=2).encode())
        written = {*files, FOLDER_FILES[1]}
    for stale in set(folder_output_files(folder)) - written - {"config.json"}:
        (folder / stale).unlink(missing_ok=True)  # an earlier write's other layout (--force)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})
