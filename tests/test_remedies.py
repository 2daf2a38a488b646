"""Remedies for dense alignment (ccamerge.maths.repair): REPAIR and the measurement helpers."""

from __future__ import annotations

import dataclasses

import torch

from ccamerge.io.files import Dataset
from ccamerge.maths.algebra import permute_state_dict, random_permutations
from ccamerge.maths.repair import (
    average_shared_space,
    preactivation_spec,
    repair_linear,
    repair_targets,
    replace_groups,
    stream_groups,
)
from ccamerge.methods import AlignContext, make_method
from ccamerge.models.archs.mlp import MLP
from ccamerge.models.archs.resnet_cifar import cifar_resnet_config
from ccamerge.models.registry import get_architecture
from ccamerge.pipeline import (
    BatchNormSettings,
    Calibration,
    MergeRecipe,
    Progress,
    build_merged,
    gather_statistics,
    load_models,
)


def _save(tmp_path, models):
    paths = []
    for i, m in enumerate(models):
        p = tmp_path / f"m{i}.pt"
        torch.save(m.state_dict(), p)
        paths.append(str(p))
    return paths


def _mlps(tmp_path, n=2):
    models = []
    for s in range(n):
        torch.manual_seed(s)
        models.append(MLP([12, 24, 20, 5]))
    loaded = load_models(_save(tmp_path, models))
    torch.manual_seed(10)
    data = Dataset(torch.randn(600, 12), None, "random")
    return loaded, data


def _pre_stats(loaded, data):
    model = loaded.build(loaded.state_dicts[0])
    pre_spec, kept = preactivation_spec(loaded.spec, model)
    pre = gather_statistics(
        dataclasses.replace(loaded, spec=pre_spec),
        Calibration(data, 100, "cpu"),
        Progress(),
        norm_stats=False,
    )
    return pre_spec, kept, pre


def test_preactivation_points_mlp_and_resnet(tmp_path):
    loaded, _ = _mlps(tmp_path)
    pre_spec, kept = preactivation_spec(loaded.spec, loaded.build(loaded.state_dicts[0]))
    assert kept == []
    assert [(g.collect_at, g.collect_on) for g in pre_spec.groups] == [
        ("layers.0", "output"),
        ("layers.1", "output"),
    ]
    config = cifar_resnet_config(depth=8, width=1, num_classes=10, in_channels=1)
    net = get_architecture("resnet_cifar").build(config)
    (path,) = _save(tmp_path, [net])
    r = load_models([path])
    pre_spec, kept = preactivation_spec(r.spec, net)
    streams = stream_groups(r.spec, net)
    assert set(kept) == streams and streams  # residual streams keep their point
    for g in pre_spec.groups:
        if g.name not in streams:
            assert g.collect_at == g.norms[0] and g.collect_on == "output"


def test_repair_meets_targets(tmp_path):
    loaded, data = _mlps(tmp_path)
    pre_spec, _, pre = _pre_stats(loaded, data)
    post = gather_statistics(loaded, Calibration(data, 100, "cpu"), Progress())
    w = [0.5, 0.5]
    alignment = make_method("cca", gamma=0.1).align(
        AlignContext(loaded.spec, loaded.state_dicts, 0, post)
    )
    _, model, _ = build_merged(
        loaded,
        MergeRecipe(w, 0, BatchNormSettings("renorm", True), "cpu", alignment),
        Calibration(data, 100, "cpu"),
        post,
    )
    targets = repair_targets(pre, alignment, w)
    assert repair_linear(model, loaded.spec, targets, list(data.batches(100))) == 2
    merged = dataclasses.replace(loaded, spec=pre_spec, state_dicts=[model.state_dict()])
    got = gather_statistics(merged, Calibration(data, 100, "cpu"), Progress(), norm_stats=False)
    for g in pre_spec.groups:
        jc = got.groups[g.name]
        mean, std = targets[g.name]
        assert torch.allclose(jc.mean_of(0), mean, atol=1e-4)
        assert torch.allclose(torch.diagonal(jc.block(0, 0)).sqrt(), std, rtol=1e-4, atol=1e-5)


def test_repair_keeps_a_permuted_copy_exact(tmp_path):
    loaded, data = _mlps(tmp_path, 1)
    sd = loaded.state_dicts[0]
    perm = permute_state_dict(sd, loaded.spec, random_permutations(loaded.spec, 3))
    pair = dataclasses.replace(loaded, paths=loaded.paths * 2, state_dicts=[sd, perm])
    _, _, pre = _pre_stats(pair, data)
    post = gather_statistics(pair, Calibration(data, 100, "cpu"), Progress())
    alignment = make_method("permute").align(AlignContext(pair.spec, pair.state_dicts, 0, post))
    w = [0.5, 0.5]
    _, model, _ = build_merged(
        pair,
        MergeRecipe(w, 0, BatchNormSettings("vector", True), "cpu", alignment),
        Calibration(data, 100, "cpu"),
        post,
    )
    repair_linear(model, pair.spec, repair_targets(pre, alignment, w), list(data.batches(100)))
    with torch.no_grad():
        want = loaded.build(sd)(data.x)
        assert torch.allclose(model(data.x), want, atol=1e-4)


def test_average_shared_space_keeps_inverses_and_identity(tmp_path):
    loaded, data = _mlps(tmp_path)
    post = gather_statistics(loaded, Calibration(data, 100, "cpu"), Progress())
    ctx = AlignContext(loaded.spec, loaded.state_dicts, 0, post)
    alignment = make_method("cca", gamma=0.1).align(ctx)
    moved = average_shared_space(alignment, [0.5, 0.5])
    for ga in moved.groups.values():
        for M, U in zip(ga.M, ga.U):
            eye = torch.eye(M.shape[0], dtype=M.dtype)
            assert torch.allclose(M @ U, eye, atol=1e-8)
        # A = sum_k w_k U_k, so sum_k w_k U_k' = A A^-1 = I: no model is the reference
        assert torch.allclose(0.5 * (ga.U[0] + ga.U[1]), torch.eye(ga.U[0].shape[0]).double())
    perm = make_method("permute").align(ctx)
    mixed = replace_groups(alignment, perm, ["hidden1"])
    assert mixed.groups["hidden1"] is perm.groups["hidden1"]
    assert mixed.groups["hidden0"] is alignment.groups["hidden0"]


def test_build_merged_repairs_networks_without_batchnorm(tmp_path):
    loaded, data = _mlps(tmp_path)
    post = gather_statistics(loaded, Calibration(data, 100, "cpu"), Progress())
    alignment = make_method("cca", gamma=0.1).align(
        AlignContext(loaded.spec, loaded.state_dicts, 0, post)
    )
    w = [0.5, 0.5]
    _, plain, note = build_merged(
        loaded,
        MergeRecipe(w, 0, BatchNormSettings("vector", True), "cpu", alignment),
        Calibration(data, 100, "cpu"),
        post,
    )
    assert note == "none (no BatchNorm)"
    _, fixed, note = build_merged(
        loaded,
        MergeRecipe(w, 0, BatchNormSettings("renorm", True), "cpu", alignment),
        Calibration(data, 100, "cpu"),
        post,
    )
    assert "REPAIR" in note
    _, _, pre = _pre_stats(loaded, data)
    repair_linear(plain, loaded.spec, repair_targets(pre, alignment, w), list(data.batches(100)))
    with torch.no_grad():
        assert torch.allclose(plain(data.x), fixed(data.x), atol=1e-5)
