"""The statistics pass serves the refit: each input model runs once over the calibration
data, the merged network once more (N + 1 passes, not 2N + 1).

The statistics pass keeps every endpoint's outputs at the refit's target points
(``ccamerge.maths.refit.EndpointOutputs``); the refit then reads them instead of running
the endpoints again. The kept outputs are the values the endpoints' own runs would give,
so the refitted merge is the same to the bit; when they would exceed the memory budget
they are dropped, the refit runs the endpoints again, and the report says so.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from test_many_models import _tiny_vgg_checkpoints
from test_refit_models import CASES, WEIGHTS, _load

import ccamerge.maths.refit.fit as refit_fit
import ccamerge.pipeline.statistics as statistics_step
from ccamerge import merge
from ccamerge.io.files import Dataset
from ccamerge.maths.refit import RefitSettings
from ccamerge.methods import make_method
from ccamerge.pipeline import (
    BatchNormSettings,
    Calibration,
    MergeRecipe,
    Progress,
    align_models,
    build_merged,
    gather_statistics,
    keep_endpoint_outputs,
    refit_merged,
)


@pytest.mark.parametrize("name, config", CASES)
def test_kept_outputs_give_the_refit_of_the_endpoints_own_runs(name, config, tmp_path):
    """Every registry architecture and a discovered custom model, three inputs, several
    calibration chunks and a row limit that keeps only some samples of a chunk: the
    statistics are the same with the keeper as without, and the refit that reads the
    kept outputs writes exactly what the refit that runs the endpoints writes."""
    loaded, shape = _load(name, config, tmp_path)
    x = torch.randn(40, *shape, generator=torch.Generator().manual_seed(4))
    calib = Calibration(Dataset(x, None), 16)
    settings = RefitSettings(max_rows=200)
    keeping = keep_endpoint_outputs(loaded, calib, settings)
    keeper = keeping.kept
    assert keeper is not None
    stats = gather_statistics(loaded, keeping, Progress(), norm_stats=False)
    plain_stats = gather_statistics(loaded, calib, Progress(), norm_stats=False)
    for g, jc in stats.groups.items():
        assert torch.equal(jc.cov, plain_stats.groups[g].cov), g
    assert len(keeper.chunks) == 3 and keeper.nbytes > 0
    alignment = align_models(make_method("cca"), loaded, 0, stats)
    recipe = MergeRecipe(WEIGHTS, 0, alignment=alignment)

    def refitted(calibration: Calibration):
        bn = BatchNormSettings("vector", False)
        recipe_bn = MergeRecipe(WEIGHTS, 0, bn, alignment=alignment)
        model = build_merged(loaded, recipe_bn, calibration, stats)[1]
        report = refit_merged(loaded, recipe, model, calibration, settings)
        return model.state_dict(), report

    ran, ran_report = refitted(calib)
    read, read_report = refitted(keeping)
    assert (ran_report.endpoint_outputs, read_report.endpoint_outputs) == (
        "refit",
        "statistics pass",
    )
    assert ran_report.warnings == read_report.warnings
    for k, v in ran.items():
        assert torch.equal(v, read[k]), k
    assert not any(keeper.chunks), "each kept output is freed when its layer is fitted"


def _samples_through_the_stem(monkeypatch, **options) -> tuple[int, dict]:
    """Merge three tiny VGGs (200 calibration samples, batches of 32, no check) and count
    the samples that pass through a first convolution, in any model."""
    seen = [0]

    def count(module, args, _out):
        if isinstance(module, torch.nn.Conv2d) and module.in_channels == 3:
            seen[0] += args[0].shape[0]

    tmp = options.pop("tmp_path")
    paths, data = _tiny_vgg_checkpoints(tmp, 3)
    handle = torch.nn.modules.module.register_module_forward_hook(count)
    try:
        result = merge(paths, data=data, batch_size=32, check=False, **options)
    finally:
        handle.remove()
    return seen[0], result.report


def test_the_default_merge_runs_each_input_once_and_the_merge_once(monkeypatch, tmp_path):
    """N + 1 passes over the 200 calibration samples; besides them only the load's
    2-sample check of the input shape and the refit's one-batch measurement of its
    memory (32 samples)."""
    seen, report = _samples_through_the_stem(monkeypatch, tmp_path=tmp_path)
    assert report["refit"]["endpoint_outputs"] == "statistics pass"
    assert seen == (3 + 1) * 200 + 2 + 32


def test_over_the_memory_budget_the_refit_runs_the_endpoints_and_writes_the_same_file(
    monkeypatch, tmp_path
):
    """A memory budget too small for the kept outputs (and for the refit's stored
    chunks): the refit runs the endpoints again (2N + 1 passes), the report says so, and
    the file is the one the N + 1-pass merge writes."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    shared = tmp_path / "shared.safetensors"
    _, report = _samples_through_the_stem(monkeypatch, tmp_path=tmp_path / "a", output=str(shared))
    assert report["refit"]["endpoint_outputs"] == "statistics pass"
    for module in (statistics_step, refit_fit):
        monkeypatch.setattr(module, "default_memory_budget", lambda device: 1000)
    again = tmp_path / "again.safetensors"
    seen, report = _samples_through_the_stem(
        monkeypatch, tmp_path=tmp_path / "b", output=str(again)
    )
    assert report["refit"]["endpoint_outputs"] == "refit"
    assert report["refit"]["mode"] == "recompute"
    assert any("ran the endpoints again" in w for w in report["warnings"])
    assert seen > (2 * 3 + 1) * 200
    a, b = load_file(str(shared)), load_file(str(again))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
