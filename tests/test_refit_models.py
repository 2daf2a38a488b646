"""The refit on every registry architecture and on a discovered custom model.

Parametrized over the registry (``test_archs._registry_cases``: every entry's example,
plus a VGG without BatchNorm, a torchvision ResNet-18 with BasicBlocks next to the
example's Bottlenecks, a CIFAR ResNet with 3x3 shortcuts), so a new architecture is
covered without new test code; the custom model is tests/custom_nets.py's residual MLP
(LayerNorm, functional ReLU, residual additions), whose groups come from discovery.
Three models with unequal merge weights throughout.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from test_archs import _registry_cases, example_config, example_input_shape, randomise
from torch import nn

from ccamerge.io.files import Dataset
from ccamerge.maths.algebra import (
    merge_state_dicts,
    permutation_matrix,
    permute_state_dict,
    random_permutations,
)
from ccamerge.maths.refit import RefitSettings, refit
from ccamerge.methods import make_method
from ccamerge.methods.base import Alignment, GroupAlignment
from ccamerge.models.custom import load_factory
from ccamerge.models.discover import discover
from ccamerge.models.registry import get_architecture
from ccamerge.models.spec import MergeSpec
from ccamerge.pipeline import (
    BatchNormSettings,
    Calibration,
    MergeRecipe,
    ModelSource,
    Progress,
    align_models,
    build_merged,
    gather_statistics,
    load_models,
    refit_merged,
)

MAKE_NET = f"{Path(__file__).parent / 'custom_nets.py'}:make_net"
CUSTOM_ARGS = {"width": 6, "hidden": 7, "depth": 2}
WEIGHTS = [0.5, 0.3, 0.2]
CASES = [*_registry_cases(), pytest.param("custom", None, id="custom-residual-mlp")]


def _build(name: str, config: dict[str, Any] | None) -> tuple[nn.Module, tuple[int, ...]]:
    """A fresh, untrained network of the case and one sample's shape."""
    if name == "custom":
        return load_factory(MAKE_NET)(**CUSTOM_ARGS), (64,)
    config = example_config(name) if config is None else config
    return get_architecture(name).build(config), example_input_shape(name, config)


def _spec(name: str, config: dict[str, Any] | None, model: nn.Module) -> MergeSpec:
    if name == "custom":
        return discover(model).spec
    return get_architecture(name).spec(example_config(name) if config is None else config)


_BN = (nn.BatchNorm1d, nn.BatchNorm2d)


def _batchnorm_inputs(model: nn.Module, x: torch.Tensor) -> dict[nn.Module, torch.Tensor]:
    """Every BatchNorm's input, channels first and flattened, in an eval-mode forward."""
    seen: dict[nn.Module, torch.Tensor] = {}

    def hook(m, args):
        seen[m] = args[0].detach().transpose(0, 1).reshape(args[0].shape[1], -1).double()

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, _BN)]
    with torch.no_grad():
        model.eval()(x)
    for h in handles:
        h.remove()
    return seen


def _make_batchnorm_honest(model: nn.Module, x: torch.Tensor) -> None:
    """Running statistics = the mean and unbiased variance of each BatchNorm's input in
    eval mode on ``x``, BatchNorm by BatchNorm in forward order."""
    order = list(_batchnorm_inputs(model, x))
    with torch.no_grad():
        for bn in order:
            v = _batchnorm_inputs(model, x)[bn]
            bn.running_mean.copy_(v.mean(1))
            bn.running_var.copy_(v.var(1))


def _layers(model: nn.Module) -> list[str]:
    """The layers the refit fits: Linear, Conv2d and LayerNorm."""
    fitted = (nn.Linear, nn.Conv2d, nn.LayerNorm)
    return [n for n, m in model.named_modules() if isinstance(m, fitted)]


@pytest.mark.parametrize("name, config", CASES)
def test_permuted_copies_give_back_the_original(name, config):
    """A model merged with two permuted copies of itself (weights 0.5/0.3/0.2, the
    alignment undoing each permutation): the refit returns the original function."""
    torch.manual_seed(0)
    model, shape = _build(name, config)
    model = randomise(model)
    x = torch.randn(24, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    _make_batchnorm_honest(model, x)  # the prior of the fit is then the model itself
    spec = _spec(name, config, model)
    models, Ms, Us = [model], [None], [None]
    for seed in (1, 2):
        perms = random_permutations(spec, seed=seed)
        permuted = copy.deepcopy(model)
        permuted.load_state_dict(permute_state_dict(model.state_dict(), spec, perms))
        models.append(permuted)
        Ms.append({g: permutation_matrix(p).T for g, p in perms.items()})
        Us.append({g: permutation_matrix(p) for g, p in perms.items()})
    eye = {g.name: torch.eye(g.size, dtype=torch.float64) for g in spec.groups}
    alignment = Alignment(
        {
            g: GroupAlignment(M=[eye[g], Ms[1][g], Ms[2][g]], U=[eye[g], Us[1][g], Us[2][g]])
            for g in eye
        }
    )
    merged = copy.deepcopy(model)
    merged.load_state_dict(
        merge_state_dicts(
            [m.state_dict() for m in models],
            spec,
            *zip(*(alignment.model_transforms(k) for k in range(3))),
            WEIGHTS,
        )
    )
    with torch.no_grad():
        original = model(x)
    report = refit(merged, models, spec, alignment, WEIGHTS, lambda: iter(x.split(10)))
    with torch.no_grad():
        error = float((merged(x) - original).abs().max())
    assert error <= 1e-9 * float(original.abs().max()), error
    assert [layer.name for layer in report.layers] == _layers(model)
    assert not [w for w in report.warnings if "samples for" not in w]


def _load(name: str, config: dict[str, Any] | None, root: Path):
    """Three networks of the case from seeds 0, 1, 2, saved and loaded back by step 1."""
    paths = []
    for seed in range(3):
        torch.manual_seed(seed)
        model, shape = _build(name, config)
        paths.append(str(root / f"m{seed}.pt"))
        torch.save(randomise(model, seed).float().state_dict(), paths[-1])
    if name == "custom":
        return load_models(paths, ModelSource(model=MAKE_NET, model_args=CUSTOM_ARGS), shape), shape
    return load_models(paths, ModelSource(arch=name)), shape


@pytest.mark.parametrize("name, config", CASES)
def test_pipeline_refit_end_to_end(name, config, tmp_path):
    """Three different networks, CCA-aligned and averaged with weights 0.5/0.3/0.2, then
    refitted by the pipeline step: every Linear/Conv layer is refitted, no layer's
    calibration residual grows, every BatchNorm's running statistics are those of its
    inputs on the calibration data (eval mode), and the merge is closer to the ensemble than the plain merge with its
    BatchNorms reset."""
    loaded, shape = _load(name, config, tmp_path)
    x = torch.randn(64, *shape, generator=torch.Generator().manual_seed(4))
    calib = Calibration(Dataset(x, None), 64)
    stats = gather_statistics(loaded, calib, Progress(), norm_stats=False)
    alignment = align_models(make_method("cca"), loaded, 0, stats)

    def assemble(reset_bn: bool) -> nn.Module:
        bn = BatchNormSettings("vector", reset_bn)
        return build_merged(loaded, MergeRecipe(WEIGHTS, 0, bn, alignment=alignment), calib, stats)[
            1
        ]

    plain, model = assemble(True), assemble(False)
    recipe = MergeRecipe(WEIGHTS, 0, alignment=alignment)
    report = refit_merged(loaded, recipe, model, calib, RefitSettings())
    assert [layer.name for layer in report.layers] == _layers(model)
    assert not [w for w in report.warnings if "samples for" not in w], report.warnings
    for layer in report.layers:
        assert layer.residual_after <= layer.residual_before * (1 + 1e-5) + 1e-7, layer
    for bn, v in _batchnorm_inputs(model, x).items():
        torch.testing.assert_close(bn.running_mean.double(), v.mean(1), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(bn.running_var.double(), v.var(1), rtol=1e-4, atol=1e-5)
    endpoints = [loaded.build(sd) for sd in loaded.state_dicts]
    with torch.no_grad():
        ensemble = sum(w * m(x) for w, m in zip(WEIGHTS, endpoints))
        gap_plain = float((plain(x) - ensemble).norm())
        gap_refit = float((model(x) - ensemble).norm())
    assert gap_refit < gap_plain, (gap_refit, gap_plain)
