"""Step 1, load: read the checkpoints and check them against one architecture, read the
data and check it fits the model's input; the options every run shares (device,
weights, reference), and the settings objects of what a run reads: where the models
come from (:class:`ModelSource`), where the data comes from (:class:`DataSettings`) and
the calibration data as every later step reads it (:class:`Calibration`)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..io.files import Dataset, load_checkpoint, load_data
from ..io.padding import PAD, accepts_padding, padded
from ..maths.algebra import fold_norms
from ..models.assumptions import state_settings
from ..models.custom import detect_custom, resolve_spec, untransformed_of
from ..models.hf import HF_NAME, detect_hf, hf_config, read_hf
from ..models.registry import Detected, detect_architecture
from ..models.spec import MergeSpec
from ..runtime import distributed
from ..runtime.errors import ArchitectureError, CheckpointError, DataError, OptionError


@dataclass(frozen=True)
class ModelSource:
    """How the checkpoints become models: a registry architecture (``arch``; None: detected),
    or a user's factory (``model``: ``pkg.module:fn`` or ``file.py:fn``, called with
    ``model_args``, :mod:`ccamerge.models.custom`), a spec file replacing the feature groups,
    and what checkpoints do not record (``activation``, :mod:`ccamerge.models.assumptions`)."""

    arch: str | None = None
    model: str | None = None
    model_args: dict[str, Any] = field(default_factory=dict)
    spec: str | None = None
    activation: str | None = None  # an MLP's activation; None: ReLU, assumed and checked

    @property
    def stated(self) -> dict[str, str | None]:
        """The settings the user stated, as :mod:`ccamerge.models.assumptions` reads them."""
        return {"activation": self.activation}


@dataclass(frozen=True)
class DataSettings:
    """Where a run's data comes from and how it is batched: the calibration file
    (``calibration``; a seeded random subset of ``num_samples`` when given), the labelled
    evaluation file, the unlabelled distillation data (a file or folder, streamed), the
    batch size and the device."""

    calibration: str | None = None
    evaluation: str | None = None
    distillation: str | None = None
    num_samples: int | None = None
    seed: int = 0
    batch_size: int = 256
    device: str = "cpu"

    def read_calibration(self) -> Calibration | None:
        """The calibration data, batched for this device (None without a file)."""
        data = read_calibration(self.calibration, self.num_samples, self.seed)
        return None if data is None else Calibration(data, self.batch_size, self.device)


@dataclass(frozen=True)
class Calibration:
    """Calibration samples as every step reads them: in batches of ``batch_size`` on
    ``device``; ``kept``: the endpoints' outputs on these batches that the statistics pass
    kept for the refit (``ccamerge.maths.refit.EndpointOutputs``; None: the refit runs the
    endpoints itself)."""

    data: Dataset
    batch_size: int = 256
    device: str = "cpu"
    kept: Any = field(default=None, compare=False, repr=False)

    def __len__(self) -> int:
        return len(self.data)

    def batches(self) -> Iterator[torch.Tensor]:
        return self.data.batches(self.batch_size)

    def with_data(self, data: Dataset) -> Calibration:
        """The same batching for other samples (a part of these)."""
        return Calibration(data, self.batch_size, self.device)


@dataclass
class LoadedModels:
    """Checkpoints read and checked against one architecture."""

    paths: list[str]
    state_dicts: list[dict[str, torch.Tensor]]
    detected: Detected
    spec: MergeSpec
    warnings: list[str] = field(default_factory=list)  # from feature-group discovery
    # the layers whose output units discovery left untransformed for a reason other than
    # reaching the model's output: not aligned, whatever their input side
    unaligned_layers: frozenset[str] = frozenset()

    def build(self, state_dict: dict[str, torch.Tensor], device: str = "cpu") -> nn.Module:
        model = self.detected.build()
        model.load_state_dict(state_dict, strict=True)
        return model.to(device).eval()


def normalise_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    if len(weights) != n:
        raise OptionError(f"{len(weights)} merge weights given for {n} checkpoints")
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise OptionError("merge weights must be finite and non-negative")
    total = float(sum(weights))
    if total <= 0:
        raise OptionError("merge weights must not all be zero")
    return [float(w) / total for w in weights]


def load_models(
    paths: Sequence[str],
    source: ModelSource | None = None,
    input_shape: Sequence[int] | None = None,
    tokens: bool = False,
) -> LoadedModels:
    """Read every checkpoint, detect the architecture from the first, check the rest fit.

    ``source.model`` (a factory, see :mod:`ccamerge.models.custom`) replaces detection; its
    feature groups are discovered on samples of ``input_shape`` (integer token ids with
    ``tokens``). A Hugging Face folder (a ``config.json`` naming a ``model_type``) is
    built from its config (:mod:`ccamerge.models.hf`). ``source.spec`` replaces the groups.
    """
    source = source or ModelSource()
    arch, model, model_args, spec_file = source.arch, source.model, source.model_args, source.spec
    if not paths:
        raise OptionError("no checkpoints given")
    if model is not None and arch is not None:
        raise OptionError("--model and --arch exclude each other")
    hf = hf_config(paths[0]) if model is None and arch in (None, HF_NAME) else None
    sds = [read_hf(p, hf) if hf and hf_config(p) else load_checkpoint(p) for p in paths]
    if model is not None:
        detect = lambda sd: detect_custom(paths[0], sd, model, model_args, input_shape, tokens)  # noqa: E731
    elif hf is not None:
        detect = lambda sd: detect_hf(hf, input_shape, tokens)  # noqa: E731
    elif arch == HF_NAME:
        raise ArchitectureError(f"{paths[0]} is not a folder with a Hugging Face config.json")
    else:
        detect = lambda sd: detect_architecture(sd, arch)  # noqa: E731
    detected, selection = find_model(sds[0], detect, paths[0], hint=model is None)
    notes = []
    for k, (path, sd) in enumerate(zip(paths, sds)):
        sds[k], ignored = selection.part(sd)
        stray = [n for n in sds[k] if k and "." not in n and n not in sds[0]]  # step counters
        ignored = sorted(ignored + [selection.prefix + n for n in stray])
        for name in stray:
            del sds[k][name]
        if selection.prefix:
            notes.append(f"{path}: read the tensors under '{selection.prefix}' as the model")
        if ignored:
            notes.append(
                f"{path}: ignored {len(ignored)} tensor(s) beside the {detected.name} model: "
                f"{_few(ignored)}"
            )
    detected = state_settings(detected, source.stated)
    spec, spec_notes = resolve_spec(detected, spec_file)
    notes += spec_notes
    ref = sds[0]
    template = detected.build()
    expected = template.state_dict()  # the dtypes the model expects
    for path, sd in zip(paths, sds):
        missing = sorted(set(ref) - set(sd))
        extra = sorted(set(sd) - set(ref))
        if missing or extra:
            _check_same_architecture(path, sd, paths[0], detected.name)
            parts = []
            if missing:
                parts.append(f"missing {_few(missing)}")
            if extra:
                parts.append(f"unexpected {_few(extra)}")
            raise ArchitectureError(f"{path} does not match {paths[0]}: {'; '.join(parts)}")
        for name, t in ref.items():
            if sd[name].shape != t.shape:
                raise ArchitectureError(
                    f"{path} does not match {paths[0]}: {name} has shape "
                    f"{tuple(sd[name].shape)}, expected {tuple(t.shape)}"
                )
            want = expected.get(name, t)
            if want.is_floating_point() != sd[name].is_floating_point():
                kind = "floating-point" if want.is_floating_point() else "integer"
                raise CheckpointError(
                    f"{path}: tensor {name} has dtype {sd[name].dtype}, expected a {kind} tensor"
                )
    try:
        spec.validate(ref)
        template.load_state_dict(ref, strict=True)
    except RuntimeError as e:
        raise ArchitectureError(f"{paths[0]} does not load into {detected.name}: {e}") from None
    if spec.folds:  # the same functions, with norms an orthogonal stream map commutes with
        sds = [fold_norms(sd, spec) for sd in sds]
    unaligned = () if spec_file else untransformed_of(detected)
    writers = frozenset(w for u in unaligned if not u.expected for w in u.writers)
    return LoadedModels(list(paths), sds, detected, spec, notes, writers)


MAX_PREFIXES = 16  # prefixes tried when the whole checkpoint fits no architecture


@dataclass(frozen=True)
class KeySelection:
    """Which tensors of a checkpoint are the model: those under ``prefix`` (stripped),
    without the names that have no dot (``step``, ``n_averaged``: no module's own
    parameters) when ``skip_dotless``."""

    prefix: str = ""
    skip_dotless: bool = False

    def part(self, sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
        """The model's tensors and the names left out."""
        model, ignored = {}, []
        for name, t in sd.items():
            rest = name[len(self.prefix) :] if name.startswith(self.prefix) else None
            if rest is None or (self.skip_dotless and "." not in rest):
                ignored.append(name)
            else:
                model[rest] = t
        return model, sorted(ignored)


def find_model(
    sd: dict[str, torch.Tensor], detect: Any, path: str, hint: bool
) -> tuple[Detected, KeySelection]:
    """Detect the architecture on the whole checkpoint, else on the tensors under a common
    dotted prefix (``model.`` of a Lightning module, ...) or without stray tensors beside
    the model: the first selection ``detect`` accepts. When none fits, the error is the
    one about the whole checkpoint (``hint``: saying that a model factory is ``missing``,
    which a command's run phrases as its option)."""
    try:
        return detect(sd), KeySelection()
    except ArchitectureError as e:
        first = e
    tried = [set(sd)]
    for selection in _selections(sd):
        part, _ = selection.part(sd)
        if not part or set(part) in tried:
            continue
        tried.append(set(part))
        try:
            return detect(part), selection
        except ArchitectureError:
            continue
    if not hint:
        raise ArchitectureError(str(first)) from None
    raise ArchitectureError(f"{path}: {first}", missing="model") from None


def _selections(sd: dict[str, torch.Tensor]) -> list[KeySelection]:
    """Candidate selections: stray tensors skipped, then each dotted prefix (one or two
    levels deep, the most common first), as is and without stray tensors."""
    counts: dict[str, int] = {}
    for name in sd:
        parts = name.split(".")
        for depth in (1, 2):
            if len(parts) > depth:
                prefix = ".".join(parts[:depth]) + "."
                counts[prefix] = counts.get(prefix, 0) + 1
    prefixes = sorted(counts, key=lambda p: (-counts[p], p.count("."), p))[:MAX_PREFIXES]
    return [KeySelection("", True)] + [
        KeySelection(p, skip) for p in prefixes for skip in (False, True)
    ]


def _check_same_architecture(path: str, sd: dict, first: str, name: str) -> None:
    """Name both architectures when a checkpoint is another kind of network."""
    try:
        other = detect_architecture(sd).name
    except ArchitectureError:
        return
    if other != name:
        raise ArchitectureError(
            f"{path} is a {other} checkpoint but {first} is a {name}; "
            "all checkpoints must share one architecture"
        )


def _few(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def check_data_fits(data: Dataset, loaded: LoadedModels, what: str) -> None:
    """A clear error when samples do not fit the model's input, or are padded token ids
    for a model that takes no attention mask."""
    shape = loaded.detected.input_shape()
    got = tuple(data.x.shape[1:])
    model = None  # built when needed, once
    if padded(data.x):
        model = loaded.build(loaded.state_dicts[0])
        if not accepts_padding(model):
            raise DataError(
                f"{what} {data.path}: its attention_mask marks padding, and only Hugging Face "
                f"models take an attention mask, not {loaded.detected.name} models (a "
                "--model's forward takes one tensor): give sequences of one length, unpadded"
            )
        padded_rows = (data.x == PAD).any(1).nonzero()[:1, 0]
        sample = torch.cat([data.x[:1], data.x[padded_rows]])  # the first row, a padded one
    else:
        sample = data.x[:2]
    if shape is not None and len(shape) == 1:
        if math.prod(got) != shape[0]:
            raise DataError(
                f"{what} {data.path}: samples of shape {got} ({math.prod(got)} values) do not "
                f"fit {loaded.detected.name} with {shape[0]} inputs"
            )
        return
    if shape is not None and got != tuple(shape):
        raise DataError(
            f"{what} {data.path}: samples of shape {got} do not fit "
            f"{loaded.detected.name}, which takes {tuple(shape)}"
        )
    try:
        if model is None:
            model = loaded.build(loaded.state_dicts[0])  # in eval mode
        with torch.no_grad():
            model(sample)
    except (RuntimeError, TypeError) as e:
        raise DataError(
            f"{what} {data.path}: samples of shape {got} do not fit {loaded.detected.name} "
            f"({str(e).splitlines()[0][:160]})"
        ) from None


def resolve_device(device: str) -> str:
    """Check ``device``; under torchrun join the process group and give this rank its own
    GPU (:func:`ccamerge.runtime.distributed.setup`)."""
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise OptionError(f"--device {device}: CUDA is not available on this machine")
    elif device != "cpu":
        raise OptionError(f"unknown device {device!r} (use cpu or cuda)")
    return distributed.setup(device)


def parse_reference(reference: int | str, n: int) -> int | None:
    """``"first"`` -> 0, an index in [0, n) -> itself, ``"best"`` -> None (chosen on data)."""
    text = str(reference).strip().lower()
    if text == "first":
        return 0
    if text == "best":
        return None
    try:
        index = int(text)
    except ValueError:
        raise OptionError(
            f"--reference must be first, best or a model index, not {str(reference)!r}"
        ) from None
    if not 0 <= index < n:
        raise OptionError(f"reference index {index} is out of range for {n} checkpoints")
    return index


def check_batch_size(batch_size: int) -> int:
    if batch_size <= 0:
        raise OptionError(f"--batch-size must be positive, got {batch_size}")
    return batch_size


def read_calibration(path: str | None, num_samples: int | None, seed: int) -> Dataset | None:
    """The calibration data (a seeded random subset of ``num_samples`` when given), or None."""
    if path is None:
        return None
    return load_data(path).subset(num_samples, seed if num_samples else None)


def read_eval_data(path: str | None, loaded: LoadedModels) -> Dataset | None:
    """The labelled evaluation data, checked against the model's input, or None."""
    if path is None:
        return None
    data = load_data(path, require_labels=True)
    check_data_fits(data, loaded, "evaluation data")
    return data
