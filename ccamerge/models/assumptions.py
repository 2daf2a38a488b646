"""What a checkpoint does not record, and a check of it on labelled data.

A state dict holds tensors, not the functions between them: an MLP's activation is
invisible in its weights. An architecture entry lists such settings in
``assumptions`` (setting -> its choices, the assumed one first); the detected
config holds the assumed value until the user states another (``--activation``).

The check: with labelled data, every input model is scored under each choice of
the setting. The activation a network was trained with fits its weights; another
one computes a different function, which scores lower. When another choice scores
clearly better than the one used (mean accuracy over the models at least
:data:`MIN_GAIN` higher, and an error rate at most 1 / :data:`ERROR_RATIO` of the
used choice's), the report warns and names it. A network checked under its own
activation is not flagged by a near relative (ReLU, leaky ReLU, GELU score alike
on a ReLU network): both conditions must hold. Under torchrun each process scores
its share of the batches and the hits are summed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..runtime import distributed
from ..runtime.errors import OptionError
from .outputs import logits_of
from .registry import Detected

MIN_GAIN = 0.02  # mean accuracy by which another choice must win to be flagged ...
ERROR_RATIO = 1.5  # ... and by which factor its error rate must be lower
CHECK_SAMPLES = 2048  # labelled samples the check scores on (the first ones)
ASSUMED = "assumed (not recorded in checkpoints)"


def settings_of(detected: Detected) -> dict[str, tuple[str, ...]]:
    """The settings ``detected`` assumes: name -> choices (the default first)."""
    return dict(getattr(detected.arch, "assumptions", {}))


def state_settings(detected: Detected, stated: dict[str, str | None]) -> Detected:
    """``detected`` with the settings the user stated (None: keep the assumption)."""
    choices = settings_of(detected)
    config = dict(detected.config)
    for name, value in stated.items():
        if value is None:
            continue
        if name not in choices:
            raise OptionError(f"--{name} does not apply to {detected.name} checkpoints")
        if value not in choices[name]:
            raise OptionError(f"--{name} must be one of {', '.join(choices[name])}, not {value!r}")
        config[name] = value
    return dataclasses.replace(detected, config=config)


def describe(
    detected: Detected, stated: dict[str, str | None], sources: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """For the report: each setting, its value, and where it came from: ``sources`` where
    it names the setting, else ``--NAME`` when stated, else :data:`ASSUMED`."""
    sources = sources or {}
    return [
        {
            "setting": name,
            "value": detected.config.get(name, choices[0]),
            "source": sources.get(name) or (f"--{name}" if stated.get(name) else ASSUMED),
        }
        for name, choices in settings_of(detected).items()
    ]


def recorded_settings(metadata: dict[str, Any]) -> tuple[dict[str, str], set[str]]:
    """The settings a transforms file was computed under (its ``assumptions``, as the
    merge reported them): ``(setting -> value, the settings the merge assumed)``."""
    recorded = {a["setting"]: a for a in metadata.get("assumptions") or []}
    values = {name: a["value"] for name, a in recorded.items()}
    return values, {name for name, a in recorded.items() if a["source"] == ASSUMED}


def check_settings(
    loaded: Any,
    data: Any,
    stated: dict[str, str | None],
    batch_size: int,
    device: str,
    remedy: str = "pass --{name} {choice}",
) -> list[str]:
    """Warnings for assumed settings that another choice fits clearly better on ``data``
    (labelled), ending with ``remedy`` (formatted with the setting's ``name`` and the
    better ``choice``). ``loaded`` is a :class:`ccamerge.pipeline.LoadedModels`."""
    if data is None or data.y is None:
        return []
    sample = data.subset(CHECK_SAMPLES)
    out = []
    for name, choices in settings_of(loaded.detected).items():
        if stated.get(name):
            continue
        used = loaded.detected.config.get(name, choices[0])
        scores = {c: _mean_accuracy(loaded, {name: c}, sample, batch_size, device) for c in choices}
        best = max(choices, key=lambda c: (scores[c], c == used))
        gain = scores[best] - scores[used]
        if gain >= MIN_GAIN and 1 - scores[used] >= ERROR_RATIO * (1 - scores[best]):
            out.append(
                f"the input models score {100 * scores[used]:.1f}% on average with {name} "
                f"{used} (assumed) but {100 * scores[best]:.1f}% with {best} on {len(sample)} "
                f"labelled samples of {data.path}: they were probably trained with {best}; "
                + remedy.format(name=name, choice=best)
            )
    return out


@torch.no_grad()
def _mean_accuracy(loaded: Any, setting: dict[str, str], data: Any, batch_size: int, device: str):
    detected = dataclasses.replace(loaded.detected, config={**loaded.detected.config, **setting})
    total = 0.0
    for sd in loaded.state_dicts:
        model = detected.build()
        model.load_state_dict(sd, strict=True)
        model = model.to(device).eval()
        batches = zip(range(0, len(data), batch_size), data.batches(batch_size))
        hits = torch.zeros(1, dtype=torch.float64)  # counts: exact in float64
        for i, x in distributed.shard(batches):
            predicted = logits_of(model(x.to(device))).argmax(1).cpu()
            hits += int((predicted == data.y[i : i + len(x)]).sum())
        distributed.all_reduce_sum([hits])
        total += float(hits) / len(data)
    return total / len(loaded.state_dicts)
