"""Automatic choice of the ridge and of the method (select.py)."""

from __future__ import annotations

import torch

from ccamerge.io.files import Dataset
from ccamerge.models.registry import detect_architecture
from ccamerge.pipeline import GAMMA_GRID, Calibration, split_heldout
from ccamerge.runs.merge import merge


def _outputs(state_dict, x):
    model = detect_architecture(state_dict).build()
    model.load_state_dict(state_dict)
    with torch.no_grad():
        return model.eval()(x)


def scaled_permuted_copy(sd, seed=0):
    """The same function with hidden units permuted and scaled by positive factors:
    ReLU(P D h) = P D ReLU(h) for D positive diagonal, so the copy is an invertible
    linear (not permutation) mix of the original's units."""
    g = torch.Generator().manual_seed(seed)
    out = {k: v.clone() for k, v in sd.items()}
    n_layers = len([k for k in sd if k.endswith(".weight")])
    for i in range(n_layers - 1):
        d = sd[f"layers.{i}.weight"].shape[0]
        perm = torch.randperm(d, generator=g)
        scale = torch.empty(d).uniform_(0.3, 3.0, generator=g)
        out[f"layers.{i}.weight"] = out[f"layers.{i}.weight"][perm] * scale[:, None]
        out[f"layers.{i}.bias"] = out[f"layers.{i}.bias"][perm] * scale
        out[f"layers.{i + 1}.weight"] = out[f"layers.{i + 1}.weight"][:, perm] / scale[None, :]
    return out


def test_heldout_split_is_disjoint_and_seeded():
    data = Dataset(torch.arange(1000.0)[:, None], torch.zeros(1000, dtype=torch.int64))
    a = split_heldout(Calibration(data), 0.2, seed=3)
    b = split_heldout(Calibration(data), 0.2, seed=3)
    assert torch.equal(a.heldout_index, b.heldout_index)
    held, stats = set(a.heldout_index.tolist()), set(a.stats_index.tolist())
    assert not held & stats and len(held | stats) == 1000 and len(held) == 200
    assert set(a.heldout.data.x[:, 0].long().tolist()) == held  # the data follows the indices


def test_statistics_never_see_the_heldout_part(digits_mlps):
    rep = merge(
        digits_mlps.paths[:2], data=str(digits_mlps.calib_path), method_params={"gamma": "auto"}
    ).report
    n = len(digits_mlps.train)
    held = rep["selection"]["heldout_samples"]
    assert held == round(0.2 * n)
    assert rep["num_samples"] == n - held


def test_auto_recovers_a_linear_mix_and_reports_a_true_winner(digits_mlps, tmp_path):
    sd = digits_mlps.models[0].state_dict()
    mixed = scaled_permuted_copy(sd)
    x = digits_mlps.test.x
    assert (_outputs(mixed, x) - _outputs(sd, x)).abs().max() < 1e-4  # same function
    path = tmp_path / "mixed.pt"
    torch.save(mixed, path)
    res = merge([digits_mlps.paths[0], path], data=str(digits_mlps.calib_path), method="auto")
    sel = res.report["selection"]
    scores = [c["score"] for c in sel["candidates"]]
    names = {c["method"] for c in sel["candidates"]}
    assert {"cca", "permute", "zipit"} <= names
    assert len([c for c in sel["candidates"] if c["method"] == "cca"]) == len(GAMMA_GRID)
    winner = next(c for c in sel["candidates"] if c["candidate"] == sel["winner"])
    assert winner["score"] == min(scores)  # never a winner worse than another candidate
    # the right answer is known: an exact alignment exists, so the merge keeps the function
    merged_out = _outputs(res.state_dict, x)
    assert (merged_out.argmax(1) == _outputs(sd, x).argmax(1)).float().mean() > 0.99
    # and permutation matching alone cannot undo the scaling
    perm = next(c for c in sel["candidates"] if c["method"] == "permute")
    assert winner["score"] < perm["score"]


def test_select_by_loss_uses_labels(digits_mlps):
    rep = merge(
        digits_mlps.paths[:2],
        data=str(digits_mlps.calib_path),
        method_params={"gamma": "auto"},
        select_by="loss",
    ).report
    sel = rep["selection"]
    assert sel["select_by"] == "loss"
    for c in sel["candidates"]:
        assert c["score"] == c["loss"]


def test_candidates_take_the_parameters_they_accept():
    from ccamerge.pipeline import candidate_methods
    from ccamerge.runtime.errors import OptionError

    (zipit,) = candidate_methods("zipit", {"alpha": 0.3, "beta": 0.25})
    assert zipit.params() == {"alpha": 0.3, "beta": 0.25}
    cands = candidate_methods("auto", {"alpha": 0.3, "ridge": "absolute", "gamma": 2.0})
    by_name = {}
    for c in cands:
        by_name.setdefault(c.name, []).append(c.params())
    assert by_name["cca"] == [{"gamma": 2.0, "ridge": "absolute"}]  # explicit gamma kept
    assert by_name["zipit"][0]["alpha"] == 0.3
    assert len(candidate_methods("auto", {})) == len(GAMMA_GRID) + 2
    import pytest

    with pytest.raises(OptionError, match="max_iter"):
        candidate_methods("auto", {"max_iter": 3})
