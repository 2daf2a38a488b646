"""Plans are built from flat options (CLI flags, ``merge()`` keywords) into settings objects."""

from __future__ import annotations

import dataclasses

import pytest

from ccamerge.runs.barrier import BarrierPlan
from ccamerge.runs.merge import MergePlan
from ccamerge.runtime.errors import OptionError

PLANS = [MergePlan, BarrierPlan]


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: p.__name__)
def test_every_flat_option_names_a_field_of_a_settings_object(plan):
    fields = {f.name: f for f in dataclasses.fields(plan)}
    for key, (part, name) in plan.OPTIONS.items():
        settings = fields[part].default_factory()
        assert name in {f.name for f in dataclasses.fields(settings)}, key
    targets = list(plan.OPTIONS.values())
    assert len(set(targets)) == len(targets)  # one option per setting


def test_flat_options_land_in_their_settings_objects():
    plan = MergePlan.from_options(
        ["a.pt", "b.pt"],
        data="calib.npz",
        batch_size=64,
        refit_ridge=0.5,
        refit=False,
        bn_mode="vector",
        method="zipit",
        method_params={"alpha": 0.3},
        activation="tanh",
        weights=[1, 2],
    )
    assert plan.checkpoints == ["a.pt", "b.pt"] and plan.weights == [1, 2]
    assert (plan.data.calibration, plan.data.batch_size, plan.data.seed) == ("calib.npz", 64, 0)
    assert (plan.refit.enabled, plan.refit.ridge) == (False, 0.5)
    assert plan.batchnorm.mode == "vector" and plan.batchnorm.reset
    assert (plan.align.method, plan.align.params) == ("zipit", {"alpha": 0.3})
    assert plan.source.stated == {"activation": "tanh"}
    assert MergePlan.from_options(["a.pt"]) == MergePlan(["a.pt"])


@pytest.mark.parametrize("key", ["refit_ridgee", "refit_settings", "source", "align"])
def test_unknown_options_and_whole_settings_objects_are_refused(key):
    with pytest.raises(OptionError, match=f"unknown option.*{key}"):
        MergePlan.from_options(["a.pt"], **{key: 1})
