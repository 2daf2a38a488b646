"""Step 7, write: the merged file with its provenance, written atomically; what a run returns."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..io.files import OUTPUT_SUFFIXES, check_output_path, save_checkpoint_atomic
from ..methods import Alignment
from .load import DataSettings


@dataclass
class MergeResult:
    state_dict: dict[str, torch.Tensor]
    model: nn.Module
    alignment: Alignment
    report: dict[str, Any]


def provenance(report: dict[str, Any], data: DataSettings) -> dict[str, Any]:
    """The output file's metadata: how it was made (``data``: where the calibration data
    came from); the refit's settings when the merge was refitted, the distillation's
    (and the data it trained on) when it was distilled."""
    metadata = {
        "format": "pt",
        "ccamerge_version": report["ccamerge_version"],
        "architecture": report["architecture"],
        "method": report["method"],
        "params": report["params"],
        "inputs": [{"name": Path(i["path"]).name, "sha256": i["sha256"]} for i in report["inputs"]],
        "reference": report["reference"],
        "weights": report["weights"],
        "num_samples": report["num_samples"],
        "calibration_data": Path(data.calibration).name if data.calibration else None,
        "seed": data.seed,
        "batchnorm": report["batchnorm"],
    }
    if "refit" in report:
        metadata["refit"] = {k: report["refit"][k] for k in ("ridge", "max_rows")}
    if "distill" in report:
        distill = report["distill"]
        metadata["distill"] = {"settings": distill["settings"], "data": distill["data"]}
    return metadata


def write_model(
    state: dict[str, torch.Tensor], path: str, inputs: list[str], force: bool, metadata: dict
) -> None:
    """Check the output path again (minutes may have passed) and write atomically, as
    safetensors with ``metadata``, a plain state dict, or a folder with a copy of the
    config.json of the first input folder that has one (:func:`save_checkpoint_atomic`)."""
    check_output_path(path, inputs, force, suffixes=OUTPUT_SUFFIXES)
    configs = (Path(p) / "config.json" for p in inputs)
    config = next((c for c in configs if c.is_file()), None)
    save_checkpoint_atomic(state, path, metadata, config)
