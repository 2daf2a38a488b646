"""The CNN patterns of tests/cnn_nets.py merged end to end: each network merged with
a copy of itself whose discovered units were permuted is the original function again,
with and without the refit, and the report says every parameter was aligned; a network
of opaque custom operations reports 0 % and plain averaging."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from cnn_nets import NETS, make_cnn
from moved import assert_merged_back
from test_archs import randomise
from test_refit_models import _make_batchnorm_honest

from ccamerge.maths.algebra import permute_state_dict, random_permutations
from ccamerge.models.discover import discover
from ccamerge.runs.merge import merge

FACTORY = f"{Path(__file__).parent / 'cnn_nets.py'}:make_cnn"
SHAPE = (3, 8, 8)
PATTERNS = [name for name in NETS if name not in ("opaque", "channel_mixing")]


def _inputs(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


def _endpoints(name: str, root: Path) -> tuple[torch.nn.Module, list[str], Path]:
    """A random network (BatchNorm statistics those of the calibration data), its
    checkpoint and a unit-permuted copy's, and the calibration file."""
    x = _inputs(96, 0)
    model = randomise(make_cnn(name)).float()
    _make_batchnorm_honest(model, x)
    spec = discover(model, SHAPE).spec
    permuted = permute_state_dict(model.state_dict(), spec, random_permutations(spec, 1))
    sd = model.state_dict()
    if spec.groups:
        assert any(not torch.equal(permuted[k], sd[k]) for k in sd), "nothing was permuted"
    paths = [str(root / "a.pt"), str(root / "b.pt")]
    torch.save(sd, paths[0])
    torch.save(permuted, paths[1])
    np.savez(root / "calib.npz", x=x.numpy())
    return model, paths, root / "calib.npz"


@pytest.mark.parametrize("name", PATTERNS)
def test_every_hidden_unit_is_in_a_group(name: str) -> None:
    """Only the logits stay untransformed: the hidden units of a Linear applied to
    channels-last tensors (a ConvNeXt block's MLP) are collected with their units last."""
    found = discover(randomise(make_cnn(name)).float(), SHAPE)
    assert [u.reasons for u in found.untransformed] == [("it reaches the model's output",)]
    if name == "layer_scale":
        assert {g.name: g.collect_axis for g in found.spec.groups}["block.fc1"] == -1


@pytest.mark.parametrize("refit", [True, False], ids=["refit", "no-refit"])
@pytest.mark.parametrize("name", PATTERNS)
def test_permuted_copy_merges_back_to_the_original(name: str, refit: bool, tmp_path) -> None:
    torch.manual_seed(0)
    model, paths, calib = _endpoints(name, tmp_path)
    x = _inputs(8, 3)
    # the test can fail: averaging the two without aligning them is another function
    naive = copy.deepcopy(model)
    pair = [torch.load(p) for p in paths]
    naive.load_state_dict({k: (pair[0][k] + pair[1][k]) / 2 for k in pair[0]})
    with torch.no_grad():
        expected = model(x)
        assert not torch.allclose(naive(x), expected, atol=1e-3), name
    result = merge(paths, model=FACTORY, model_args={"name": name}, data=str(calib), refit=refit)
    assert_merged_back(result, x, expected, name)


def test_opaque_network_is_plain_averaging(tmp_path) -> None:
    _, paths, calib = _endpoints("opaque", tmp_path)
    result = merge(paths, model=FACTORY, model_args={"name": "opaque"}, data=str(calib))
    report = result.report
    assert report["method"] == "average"
    assert report["aligned"]["fraction"] == 0.0
    assert report["aligned"]["parameters"] == 0
    assert "OpaqueConv" not in report["aligned"]["kept_averaged"]  # named by their layers
    assert set(report["aligned"]["kept_averaged"]) == {"Conv2d", "Linear"}
    assert "selection" not in report  # no candidate search over identical merges
    text = " ".join(report["warnings"])
    assert "plain averaging" in text
    assert "only 0% of the parameters were aligned; kept averaged: Conv2d" in text


def test_a_layer_whose_outputs_stay_untransformed_is_not_counted_aligned(tmp_path) -> None:
    """conv2 reads the aligned units of conv1, but its own outputs are mixed over the
    channels (a cumulative sum) and stay untransformed: only conv1 counts as aligned."""
    model, paths, calib = _endpoints("channel_mixing", tmp_path)
    result = merge(paths, model=FACTORY, model_args={"name": "channel_mixing"}, data=str(calib))
    aligned = result.report["aligned"]
    conv1 = sum(p.numel() for p in model.conv1.parameters())
    assert aligned["parameters"] == conv1, aligned
    assert aligned["kept_averaged"] == {
        "Conv2d": sum(p.numel() for p in model.conv2.parameters()),
        "Linear": sum(p.numel() for p in model.head.parameters()),
    }


def _refitted_layers(model: torch.nn.Module) -> set[str]:
    fitted = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.LayerNorm)
    return {n for n, m in model.named_modules() if isinstance(m, fitted)}


@pytest.mark.parametrize("name", ["subclassed_linear", "bn_act", "layer_scale", "grouped"])
def test_functional_layers_are_refitted(name: str, tmp_path) -> None:
    """``F.linear`` in a subclass's forward is refitted, its BatchNorm (``F.batch_norm``)
    folded or measured, grouped and depthwise convs per conv group, a LayerNorm2d's
    ``F.layer_norm`` gain and bias; only a gain (layer scale) is left as 'used outside a
    module call'."""
    model, paths, calib = _endpoints(name, tmp_path)
    result = merge(paths, model=FACTORY, model_args={"name": name}, data=str(calib))
    fitted = {layer["name"] for layer in result.report["refit"]["layers"]}
    assert fitted == _refitted_layers(model)
    loose = [w for w in result.report["warnings"] if "outside a module" in w]
    assert loose == (
        ["parameter block.gamma is used outside a module call; it keeps its averaged value"]
        if name == "layer_scale"
        else []
    )  # a gain: averaged
    if name == "bn_act":
        assert {layer["norm"] for layer in result.report["refit"]["layers"]} >= {"bn1", "bn2"}


def test_dense_maps_of_permutation_groups_become_permutations_within_blocks() -> None:
    """A depthwise/grouped conv's group given a dense map (CCA on real models) gets the
    permutation matched within each block; a permutation that crosses blocks is redone."""
    from ccamerge.methods.base import Alignment, GroupAlignment
    from ccamerge.models.spec import FeatureGroup, MergeSpec
    from ccamerge.pipeline.align import constrain

    g = FeatureGroup("g", 4, (("conv.weight", 0),), "conv", permutation=True, blocks=2)
    noisy = torch.tensor([[0.1, 0.9, 0.2, 0.0], [1.0, 0.1, 0.0, 0.3],
                          [0.0, 0.2, 0.1, 0.8], [0.4, 0.0, 0.9, 0.1]], dtype=torch.float64)  # fmt: skip
    crossing = torch.eye(4, dtype=torch.float64)[[2, 3, 0, 1]]
    eye = torch.eye(4, dtype=torch.float64)
    for M, expected in ((noisy, [1, 0, 3, 2]), (crossing, [0, 1, 2, 3])):
        aligned = constrain(
            Alignment({"g": GroupAlignment([eye, M], [eye, M])}), MergeSpec((g,)), 0, None
        )
        P = aligned.groups["g"].M[1]
        assert P.argmax(1).tolist() == expected
        assert torch.equal(aligned.groups["g"].U[1], P.T)


def test_asked_for_averaging_reports_nothing_aligned(tmp_path) -> None:
    """Identity maps transform nothing: ``--method average`` reports 0 % aligned, without
    the warning (it was asked for)."""
    _, paths, calib = _endpoints("depthwise", tmp_path)
    result = merge(
        paths, model=FACTORY, model_args={"name": "depthwise"}, data=str(calib), method="average"
    )
    assert result.report["aligned"]["fraction"] == 0.0
    assert not [w for w in result.report["warnings"] if "were aligned" in w]
