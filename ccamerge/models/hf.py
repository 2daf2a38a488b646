"""Hugging Face ``transformers`` models, read from and written to checkpoint folders.

A folder with a ``config.json`` that names a ``model_type`` (what ``save_pretrained``
writes) is read without ``--model``: the model class is the config's first
``architectures`` entry, accepted only when it is one of the classes the ``transformers``
auto classes map to, and the weights are read by that class's ``from_pretrained`` from the
folder alone (a weight it would initialise at random is an error). No code is taken from
the folder or a hub: a config that asks for its own code (``auto_map``) is refused, and
nothing is downloaded. The merged tensors are written as ``save_pretrained`` lays them
out (its names, tied weights once), so that the merged folder loads back with
``from_pretrained``. ``transformers`` is an optional dependency (``pip install
'ccamerge[hf]'``).

Weights a model ties (GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``): the built
model accepts a state dict with or without the duplicate names, and its own state dict
leaves them out.
"""

from __future__ import annotations

import contextlib
import functools
import json
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..io.files import checked_checkpoint, load_checkpoint
from ..io.padding import accept_padding
from ..runtime.errors import ArchitectureError, CheckpointError, SpecError
from .custom import CustomArchitecture, few_names, first_line
from .discover import Discovery, discover
from .hf_layouts import LAYOUTS, canonical_layout, layout_spec, native_layout
from .registry import Detected
from .spec import MergeSpec

HF_EXTRA = "pip install 'ccamerge[hf]'"
HF_NAME = "huggingface"  # the architecture name reports and saved transforms give


def hf_config(path: str | Path) -> dict[str, Any] | None:
    """The ``config.json`` of a Hugging Face checkpoint folder (one naming a
    ``model_type`` that transformers knows and the model's ``architectures``); None for
    anything else."""
    file = Path(path) / "config.json"
    if not Path(path).is_dir() or not file.is_file():
        return None
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file} is not a JSON file ({type(e).__name__}: {e})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        return None
    if not isinstance(config.get("architectures"), list) or not config["architectures"]:
        return None  # not what save_pretrained writes: read the tensors as any checkpoint
    return config if _known_model_type(config["model_type"]) else None


def _known_model_type(model_type: str) -> bool:
    """Whether the installed transformers knows ``model_type`` (True without
    transformers: building the model then says what to install)."""
    try:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    except ImportError:
        return True
    return model_type in CONFIG_MAPPING_NAMES


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ArchitectureError(
            "this checkpoint folder holds a Hugging Face model (config.json); building it "
            f"needs transformers: {HF_EXTRA} (or give --model)"
        ) from None
    return transformers


@contextlib.contextmanager
def _quiet(transformers: Any) -> Iterator[None]:
    """``transformers``' notes and progress bars silenced while ccamerge calls it (they
    would go to stderr between the report's lines); the caller's settings restored after."""
    verbosity = transformers.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.logging.enable_progress_bar()


@functools.cache
def _known_classes() -> frozenset[str]:
    """Every class name that one of the ``transformers`` auto classes maps to (read once:
    every model built checks its class)."""
    _transformers()
    from transformers.models.auto import modeling_auto

    names: set[str] = set()
    for attr in dir(modeling_auto):
        if attr.endswith("_MAPPING_NAMES") and attr != "CONFIG_MAPPING_NAMES":
            for value in getattr(modeling_auto, attr).values():
                names.update([value] if isinstance(value, str) else value)
    return frozenset(names)


def model_class(config: Mapping[str, Any]) -> str:
    """The class a config builds: its first ``architectures`` entry, checked."""
    if "auto_map" in config:
        raise ArchitectureError(
            "config.json asks for the folder's own code (auto_map); ccamerge never runs code "
            "from a checkpoint: give --model with a factory you trust"
        )
    name = config["architectures"][0]
    if not isinstance(name, str) or name not in _known_classes():
        raise ArchitectureError(
            f"config.json names {name!r}, which is not a class of the installed transformers "
            "(upgrade transformers, or give --model)"
        )
    return name


def build_hf(config: Mapping[str, Any]) -> nn.Module:
    """The model of ``{"class": name, "hf_config": config.json}`` with random weights,
    in eval mode, tied duplicates left out of its state dict."""
    transformers = _transformers()
    hf = dict(config["hf_config"])
    name = model_class(hf)  # checked again: only a class transformers' auto classes know
    try:
        with _quiet(transformers):
            cfg = transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)
            model = getattr(transformers, name)(cfg)
    except Exception as e:
        raise ArchitectureError(
            f"transformers cannot build {name} from config.json ({first_line(e)})"
        ) from None
    return _prepared(model)


def _prepared(model: nn.Module) -> nn.Module:
    model.config.use_cache = False  # no key/value cache among the outputs
    _hide_tied_duplicates(model)
    canonical_layout(model, model.config.model_type)
    accept_padding(model)  # padded token data reaches it as input_ids and attention_mask
    return model.eval()


def read_hf(folder: str | Path, hf: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The state dict of a Hugging Face folder, as its model class's ``from_pretrained``
    reads it (the folder's config, no download); weights the folder lacks or holds in
    another shape are an error, not initialised at random."""
    name = model_class(hf)
    transformers = _transformers()
    try:
        with _quiet(transformers):
            model, info = getattr(transformers, name).from_pretrained(
                str(folder),
                local_files_only=True,
                trust_remote_code=False,
                output_loading_info=True,
            )
    except Exception as e:
        raise CheckpointError(
            f"transformers cannot read {folder} as {name} ({first_line(e)})"
        ) from None
    absent = list(info.get("missing_keys", ())) + [
        str(k[0]) for k in info.get("mismatched_keys", ())
    ]
    if absent:
        raise CheckpointError(
            f"checkpoint {folder}: {name} would initialise {few_names(sorted(absent))} at random "
            "(the folder's weights lack them or have other shapes)"
        )
    return checked_checkpoint(_prepared(model).state_dict(), folder)


def _tied_duplicates(model: nn.Module) -> list[str]:
    """The names under which a tensor shared under several names appears after its first."""
    first: set[int] = set()
    duplicates = []
    named = [*model.named_parameters(remove_duplicate=False)]
    for name, t in named + [*model.named_buffers(remove_duplicate=False)]:
        if id(t) in first:
            duplicates.append(name)
        first.add(id(t))
    return duplicates


def _hide_tied_duplicates(model: nn.Module) -> None:
    """State-dict hooks: a tensor shared under several names is saved under its first name
    only, and loading does not miss the others (they are the same tensor)."""
    duplicates = _tied_duplicates(model)
    if not duplicates:
        return

    def drop(module, state_dict, prefix, local_metadata):
        for name in duplicates:
            state_dict.pop(prefix + name, None)

    def allow_missing(module, incompatible):
        for name in duplicates:
            if name in incompatible.missing_keys:
                incompatible.missing_keys.remove(name)

    model._register_state_dict_hook(drop)
    model.register_load_state_dict_post_hook(allow_missing)


class HuggingFaceArchitecture(CustomArchitecture):
    """A ``transformers`` model from a folder's config.json, as an architecture entry;
    groups discovered as for ``--model`` (none when torch.fx cannot trace it: the models
    are then averaged as they are, and the report says so)."""

    name = HF_NAME
    description = "a Hugging Face transformers model built from a folder's config.json"

    def __init__(self, hf: Mapping[str, Any]) -> None:
        self.ref = model_class(hf)
        self.hf = dict(hf)
        self._discoveries: dict[str, Discovery] = {}

    def source(self) -> dict[str, Any]:
        return {"class": self.ref, "hf_config": self.hf}

    def build(self, config: Mapping[str, Any]) -> nn.Module:
        return build_hf(config)

    def discover(self, model: nn.Module, shape: Sequence[int] | None, tokens: bool) -> Discovery:
        """The family's layout (:mod:`.hf_layouts`) when it has one that covers the model;
        else torch.fx discovery; else no group (the models are averaged as they are)."""
        spec, misfit = layout_spec(
            self.hf["model_type"], model.config.to_dict(), model.state_dict()
        )
        if spec is not None:
            return Discovery(spec, (), (), tuple(shape or ()))
        try:
            return discover(model, shape, tokens)
        except SpecError as e:
            return Discovery(MergeSpec(groups=()), (), (_untraced(self.ref, misfit or e),), ())

    def saved_tensors(
        self, config: Mapping[str, Any], state: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """``state`` as ``save_pretrained`` writes it: the names and layout of the
        model's files, each tied tensor once."""
        model = self.build(config)
        model.load_state_dict(state, strict=True, assign=True)  # the state's dtypes
        model.tie_weights()  # assigning replaced the tensors that tied names share
        with tempfile.TemporaryDirectory() as folder, _quiet(_transformers()):
            native_layout(model).save_pretrained(folder)
            return {k: v.clone() for k, v in load_checkpoint(folder).items()}


def _untraced(name: str, why: object) -> str:
    return (
        f"{why}: no feature group found, so {name} models are averaged as they are (fine "
        "for fine-tunes of one pretrained model; models trained from different seeds need "
        f"the transformer alignment, built for the families {', '.join(LAYOUTS)})"
    )


def detect_hf(
    hf: Mapping[str, Any], input_shape: Sequence[int] | None = None, tokens: bool = False
) -> Detected:
    """The :class:`Detected` for a Hugging Face folder's config. Its weights need no fit
    check here: :func:`read_hf` read them with this very model class."""
    arch = HuggingFaceArchitecture(hf)
    return Detected(arch, arch.config(input_shape, tokens))
