"""The check and ``--distill`` through the command line: what a merge reports, writes and
records, and what ``apply`` repeats (the algorithms themselves: tests/test_distill.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from cli_run import refused, run
from safetensors.torch import load_file

QUICK = ("--batch-size", "128", "-q")


def merge_json(*args) -> dict:
    res = run("merge", *args, *QUICK, "--json")
    assert res.exit_code == 0, res.stderr
    return json.loads(res.stdout)


def largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.mark.parametrize("epochs", ["2", "auto"])
def test_a_model_merged_and_distilled_with_itself_is_left_near_unchanged(
    digits_mlps, tmp_path, epochs
):
    """The refit returns the model to round-off (1e-4); Adam's steps do not shrink with the
    gradient, so each one may move a weight by up to the learning rate (3e-4): the function
    stays the model's (held-out KL below 1e-4, every sample agreeing)."""
    path, out = digits_mlps.paths[0], tmp_path / "same.safetensors"
    calib = ("--data", digits_mlps.calib_path)
    doc = merge_json(path, path, *calib, "-o", out, "--distill", epochs)
    original = torch.load(path, weights_only=True)
    steps = doc["distill"]["steps"]
    assert largest_difference(load_file(out), original) < 1e-4 + 3e-4 * steps
    assert doc["distill"]["data"] == "calibration" and doc["warnings"] == []
    assert doc["check"]["beaten_by"] == [] and doc["check"]["merged"]["top1_agreement"] == 1.0
    assert doc["check"]["merged"]["kl"] < 1e-4
    if epochs == "auto":  # never ends further from the ensemble than it started
        assert doc["distill"]["final"]["kl"] <= doc["distill"]["history"][0]["kl"]


def test_an_unaligned_average_is_flagged_and_distillation_brings_it_closer(digits_mlps):
    calib = ("--data", digits_mlps.calib_path)
    plain = merge_json(*digits_mlps.paths[:2], *calib, "-m", "average", "--no-refit")
    flagged = plain["check"]["beaten_by"]
    assert flagged, plain["check"]  # an input alone agrees better with the ensemble
    assert [w for w in plain["warnings"] if "--distill auto" in w and any(f in w for f in flagged)]
    trained = merge_json(*digits_mlps.paths[:2], *calib, "-m", "average", "--no-refit",
                         "--distill", "3")  # fmt: skip
    history = trained["distill"]["history"]
    assert history[0]["kl"] == pytest.approx(plain["check"]["merged"]["kl"], rel=1e-6)
    assert trained["check"]["merged"]["kl"] < 0.8 * plain["check"]["merged"]["kl"]
    assert trained["check"]["merged"]["kl"] == pytest.approx(history[-1]["kl"], rel=1e-6)
    if trained["check"]["beaten_by"]:  # the remedy no longer proposes what was done
        assert not [w for w in trained["warnings"] if "--distill auto" in w]


def test_the_check_holds_out_its_samples_and_can_be_turned_off(digits_mlps):
    calib = ("--data", digits_mlps.calib_path)
    n = len(digits_mlps.train)
    doc = merge_json(*digits_mlps.paths[:2], *calib, "--check-fraction", "0.25")
    assert doc["check"]["num_samples"] == round(0.25 * n)
    assert doc["num_samples"] == n - doc["check"]["num_samples"]
    off = merge_json(*digits_mlps.paths[:2], *calib, "--no-check")
    assert "check" not in off and off["num_samples"] == n
    res = run("merge", *digits_mlps.paths[:2], *calib, "--no-check", "--distill", "auto")
    assert "--no-check" in refused(res)


def test_distillation_is_recorded_and_apply_repeats_it(digits_mlps, tmp_path):
    extra = tmp_path / "extra.npy"
    np.save(extra, digits_mlps.test.x.numpy())  # unlabelled samples, streamed from disk
    out, transforms = tmp_path / "merged.safetensors", tmp_path / "t.safetensors"
    models, calib = digits_mlps.paths[:2], ("--data", digits_mlps.calib_path)
    doc = merge_json(*models, *calib, "-o", out, "--save-transforms", transforms,
                     "--distill", "2", "--distill-data", extra)  # fmt: skip
    assert doc["distill"]["data"] == "extra.npy"
    assert doc["distill"]["samples"] == len(digits_mlps.test)
    assert doc["distill"]["settings"]["epochs"] == 2
    with open(out, "rb") as f:  # the provenance records the settings and the data
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    recorded = json.loads(header["__metadata__"]["distill"])
    assert recorded == {"settings": doc["distill"]["settings"], "data": "extra.npy"}
    again = tmp_path / "again.safetensors"
    res = run("apply", *models, "-t", transforms, *calib, "-o", again, *QUICK)
    assert "--distill-data" in refused(res) and not again.exists()
    res = run("apply", *models, "-t", transforms, *calib, "--distill-data", extra, "-o", again,
              *QUICK)  # fmt: skip
    assert res.exit_code == 0, res.stderr
    assert largest_difference(load_file(again), load_file(out)) == 0.0


def test_distillation_options_are_refused_in_one_line(digits_mlps, tmp_path):
    models, calib = digits_mlps.paths[:2], ("--data", digits_mlps.calib_path)
    out = tmp_path / "never.safetensors"
    cases = [
        (("--distill", "many"), "--distill"),
        (("--distill", "0"), "epochs"),
        (("--augment", "flip"), "--distill"),
        (("--distill", "2", "--augment", "flip"), "(C, H, W)"),  # the digits MLP is flat
        (("--distill", "2", "--augment", "rotate"), "rotate"),
        (("--distill-data", digits_mlps.calib_path), "--distill"),
    ]
    for options, says in cases:
        line = refused(run("merge", *models, *calib, *options, "-o", out, *QUICK))
        assert says in line, (options, line)
    assert not out.exists()
