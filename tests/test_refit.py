"""The sequential least-squares refit (ccamerge.maths.refit, docs/refit.md).

Networks are randomly initialised (BatchNorm buffers randomised too) and fed random
inputs: every property tested here is exact algebra, no training is needed.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ccamerge.maths.algebra import (
    merge_state_dicts,
    permutation_matrix,
    permute_state_dict,
    random_permutations,
)
from ccamerge.maths.bn import reset_batchnorm
from ccamerge.maths.refit import (
    AffineEquations,
    NormalEquations,
    RefitSettings,
    default_memory_budget,
    refit,
)
from ccamerge.maths.refit import memory as refit_memory
from ccamerge.methods.base import Alignment, GroupAlignment, identity_alignment
from ccamerge.models.archs.mlp import MLP
from ccamerge.models.archs.resnet_cifar import cifar_resnet_config
from ccamerge.models.archs.vgg import vgg_config
from ccamerge.models.registry import detect_architecture, get_architecture
from ccamerge.models.spec import MergeSpec, SpecBuilder
from ccamerge.runtime.errors import RefitError


def _randomise_norms(model: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            for t in (m.weight.data, m.bias.data, m.running_mean):
                t.copy_(
                    0.3 * torch.randn(t.shape, generator=gen) + (1.0 if t is m.weight.data else 0.0)
                )
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
    return model.eval()


def _net(arch: str, seed: int) -> tuple[nn.Module, MergeSpec, tuple[int, ...]]:
    """A random registry network, its spec and its per-sample input shape."""
    torch.manual_seed(seed)
    if arch == "mlp":
        model, shape = MLP([64, 32, 32, 10]), (64,)
    elif arch == "vgg":
        config = vgg_config((1, 1, 1), (16, 32, 64), batch_norm=True, num_classes=10, in_channels=1)
        model, shape = get_architecture("vgg").build(config), (1, 8, 8)
    else:
        config = cifar_resnet_config(depth=14, width=1, num_classes=10, in_channels=1)
        model, shape = get_architecture("resnet_cifar").build(config), (1, 16, 16)
    model = _randomise_norms(model, seed)
    return model, detect_architecture(model.state_dict()).spec(), shape


def _permutation_alignment(spec: MergeSpec, perms: dict) -> Alignment:
    """Model 0 as it is, model 1 = model 0 with every group's units reordered by ``perms``."""
    groups = {}
    for g in spec.groups:
        P, eye = permutation_matrix(perms[g.name]), torch.eye(g.size, dtype=torch.float64)
        groups[g.name] = GroupAlignment(M=[eye, P.T], U=[eye, P])
    return Alignment(groups)


def _merged(models, spec, alignment, weights) -> nn.Module:
    Ms, Us = zip(*(alignment.model_transforms(k) for k in range(len(models))))
    sds = [m.state_dict() for m in models]
    merged = copy.deepcopy(models[0])
    merged.load_state_dict(merge_state_dicts(sds, spec, Ms, Us, weights))
    return merged.eval()


def _with_permuted_copy(arch: str, calib_seed: int):
    """A random network whose BatchNorms hold the statistics of the calibration data (so
    that the prior of the fit, the average with those statistics, is the network itself),
    a permuted copy, the alignment undoing the permutation, and the calibration data."""
    model, spec, shape = _net(arch, 0)
    x = torch.randn(128, *shape, generator=torch.Generator().manual_seed(calib_seed))
    reset_batchnorm(model, [x])
    perms = random_permutations(spec, seed=1)
    copy_ = copy.deepcopy(model)
    copy_.load_state_dict(permute_state_dict(model.state_dict(), spec, perms))
    alignment = _permutation_alignment(spec, perms)
    return model, copy_, spec, alignment, x


def _batches(x: torch.Tensor, size: int):
    return lambda: iter(x.split(size))


def _damage(model: nn.Module, seed: int) -> None:
    """Noise on every Linear/Conv weight and bias and every BatchNorm affine parameter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.BatchNorm2d)):
                for p in m.parameters(recurse=False):
                    p.add_(0.3 * p.abs().mean() * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("arch", ["mlp", "vgg", "resnet_cifar"])
@pytest.mark.parametrize("damaged", [False, True])
def test_permuted_copy_gives_back_the_original(arch, damaged):
    """Merged with a permuted copy of itself, the refit returns the original function.
    ``damaged``: the merged weights are perturbed first; the targets are exact and every
    layer has more samples than inputs, so the fit (tiny ridge) repairs them all."""
    model, permuted, spec, alignment, x = _with_permuted_copy(arch, 3)
    if damaged:  # in float64: with a tiny ridge, float32 rounding would dominate
        model, permuted, x = model.double(), permuted.double(), x.double()
    merged = _merged([model, permuted], spec, alignment, [0.5, 0.5])
    if damaged:
        _damage(merged, 2)
    before = [copy.deepcopy(m.state_dict()) for m in (model, permuted)]
    with torch.no_grad():
        original = model(x)
        scale = float(original.abs().max())
        assert (merged(x) - original).abs().max() > (0.1 * scale if damaged else -1)
    report = refit(
        merged,
        [model, permuted],
        spec,
        alignment,
        [0.5, 0.5],
        _batches(x, 48),
        settings=RefitSettings(ridge=1e-9 if damaged else 1e-3),
    )
    with torch.no_grad():
        error = float((merged(x) - original).abs().max())
    assert error < (2e-5 if damaged else 2e-4) * scale, (error, scale)
    assert report.mode == "stored" and not report.warnings
    n_layers = sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in model.modules())
    assert len(report.layers) == n_layers
    for layer in report.layers:
        assert layer.residual_after <= layer.residual_before * (1 + 1e-6) + 1e-12, layer
        assert layer.residual_after < (1e-10 if damaged else 1e-6), layer
    for m, sd in zip((model, permuted), before):  # the endpoints are untouched
        for k, v in m.state_dict().items():
            assert torch.equal(v, sd[k]), k
    if arch == "resnet_cifar":  # every block's second conv or shortcut reads the sum
        assert any(layer.residual_sum for layer in report.layers)
        assert all(layer.norm for layer in report.layers if layer.kind == "conv")


def _linear_net(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 6), nn.Linear(6, 4)).double().eval()


def _linear_spec() -> MergeSpec:
    b = SpecBuilder()
    for group, writer, reader in (("h1", "0", "1"), ("h2", "1", "2")):
        b.writes(group, 6, writer)
        b.reads(group, 6, reader)
        b.collect(group, writer)
    return b.build()


@pytest.mark.parametrize("undone", [("h1", "h2"), ("h1",), ()])
def test_linear_network_mixed_copy_is_recovered(undone):
    """A network without activations merged with a copy whose hidden units are mixed by
    invertible matrices: exact whatever the alignment (``undone``: the groups whose
    mixing the alignment undoes; identity for the others)."""
    model, spec = _linear_net(0), _linear_spec()
    gen = torch.Generator().manual_seed(4)
    A = {
        g: torch.eye(6, dtype=torch.float64)
        + 0.5 * torch.randn(6, 6, generator=gen, dtype=torch.float64)
        for g in ("h1", "h2")
    }
    mixed = copy.deepcopy(model)
    mixed.load_state_dict(
        merge_state_dicts(
            [model.state_dict()], spec, [A], [{g: torch.linalg.inv(a) for g, a in A.items()}], [1.0]
        )
    )
    x = torch.randn(40, 8, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        original = model(x)
        assert (mixed(x) - original).abs().max() < 1e-12  # the same function
    eye = torch.eye(6, dtype=torch.float64)
    alignment = Alignment(
        {
            g: GroupAlignment(M=[eye, torch.linalg.inv(a)], U=[eye, a])
            if g in undone
            else GroupAlignment(M=[eye, eye], U=[eye, eye])
            for g, a in A.items()
        }
    )
    merged = _merged([model, mixed], spec, alignment, [0.3, 0.7])
    with torch.no_grad():
        gap = float((merged(x) - original).abs().max())
        assert gap < 1e-12 if len(undone) == 2 else gap > 0.05
    report = refit(
        merged,
        [model, mixed],
        spec,
        alignment,
        [0.3, 0.7],
        _batches(x, 16),
        RefitSettings(ridge=1e-14),
    )
    with torch.no_grad():
        assert (merged(x) - original).abs().max() < 1e-9
    assert all(layer.residual_after < 1e-12 for layer in report.layers)


def test_normal_equations_stream():
    """G, R and |t|^2 summed over blocks equal the one-block products."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(100, 7, generator=gen, dtype=torch.float64)
    T = torch.randn(100, 3, generator=gen, dtype=torch.float64)
    whole, parts = NormalEquations(7, 3), NormalEquations(7, 3)
    whole.add(X, T)
    bounds = (0, 13, 50, 51, 100)
    for i, j in zip(bounds[:-1], bounds[1:]):
        parts.add(X[i:j], T[i:j])
    for eq in (whole, parts):
        torch.testing.assert_close(eq.G, X.T @ X, rtol=1e-13, atol=1e-12)
        torch.testing.assert_close(eq.R, X.T @ T, rtol=1e-13, atol=1e-12)
        torch.testing.assert_close(eq.target_norm, (T * T).sum(), rtol=1e-13, atol=0)
        assert eq.samples == 100


@pytest.mark.parametrize("bias", [True, False])
def test_affine_equations_recover_a_gain_and_bias_exactly(bias):
    """Targets that are exactly ``g n + b`` give back g and b (ridge 0, residual 0); the
    sums streamed over blocks equal the one-block sums."""
    gen = torch.Generator().manual_seed(0)
    n = torch.randn(90, 5, generator=gen, dtype=torch.float64)
    g = torch.randn(5, generator=gen, dtype=torch.float64)
    b = torch.randn(5, generator=gen, dtype=torch.float64) if bias else torch.zeros(5).double()
    whole, parts = AffineEquations(5, bias), AffineEquations(5, bias)
    whole.add(n, g * n + b)
    for i, j in ((0, 7), (7, 60), (60, 90)):
        parts.add(n[i:j], g[None] * n[i:j] + b)
    for key in AffineEquations.KEYS:
        torch.testing.assert_close(parts.sums[key], whole.sums[key], rtol=1e-13, atol=1e-12)
    start = torch.ones(5), torch.zeros(5) if bias else None
    gain, shift = parts.solve(*start, ridge=0.0)
    torch.testing.assert_close(gain, g, rtol=1e-10, atol=1e-12)
    if bias:
        torch.testing.assert_close(shift, b, rtol=1e-10, atol=1e-12)
    else:
        assert shift is None
    assert parts.residual(gain, shift) < 1e-12  # from expanded sums: round-off remains
    assert parts.residual(*start) > 0.1


class _LlamaStyleNorm(nn.Module):
    """An RMS norm as the Llama family writes it; ``offset``: Gemma's ``(1 + weight)``."""

    def __init__(self, size: int, offset: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.variance_epsilon, self.offset = 1e-6, offset

    def forward(self, x):
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (1 + self.weight if self.offset else self.weight) * x


class _Normed(nn.Module):
    """A norm between two Linears; ``hooked`` adds data-dependent control flow, which
    torch.fx cannot trace (the refit then runs through module hooks)."""

    def __init__(self, norm: nn.Module, hooked: bool) -> None:
        super().__init__()
        self.hooked = hooked
        self.fc = nn.Linear(4, 6)
        self.norm = norm
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        y = self.head(self.norm(self.fc(x)))
        return (y if y.sum() > 0 else -y) if self.hooked else y


NORMS = {  # name: (the norm, refitted through module hooks, the kind the report names)
    "layernorm": (lambda: nn.LayerNorm(6), False, "layernorm"),
    "layernorm without bias": (lambda: nn.LayerNorm(6, bias=False), False, "layernorm"),
    "layernorm, hooked": (lambda: nn.LayerNorm(6), True, "layernorm"),
    "torch rmsnorm, hooked": (lambda: nn.RMSNorm(6, eps=1e-6), True, "rmsnorm"),
    "llama-style rmsnorm, hooked": (lambda: _LlamaStyleNorm(6), True, "rmsnorm"),
}


@pytest.mark.parametrize("case", NORMS)
def test_a_damaged_norm_is_refitted_to_its_endpoints(case):
    """Endpoints equal; the merge's norm gain (and bias) damaged: the refit (ridge 1e-12:
    a LayerNorm's outputs sum to a constant, so the head's inputs are collinear) fits
    them back to the endpoints' exactly, traced or through module hooks (where RMS norms,
    torch's or written as the Llama family writes them, are recognised by what they
    compute)."""
    make, hooked, kind = NORMS[case]
    torch.manual_seed(0)
    model = _Normed(make(), hooked).double()
    bias = getattr(model.norm, "bias", None)
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
        if bias is not None:
            bias.uniform_(-0.5, 0.5)
    merged = copy.deepcopy(model)
    with torch.no_grad():
        merged.norm.weight.mul_(3.0)
        if bias is not None:
            merged.norm.bias.add_(1.0)
    spec = MergeSpec(())
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    report = refit(
        merged, [model, model], spec, identity_alignment(spec, 2), [0.5, 0.5],
        _batches(x, 16), RefitSettings(ridge=1e-12),
    )  # fmt: skip
    assert not report.warnings[1 if hooked else 0 :]
    fits = {layer.name: layer for layer in report.layers}
    assert list(fits) == ["fc", "norm", "head"]
    assert fits["norm"].kind == kind and fits["norm"].inputs == 1 + int(bias is not None)
    assert fits["norm"].residual_before > 0.1 and fits["norm"].residual_after < 1e-12
    for name, tensor in model.norm.state_dict().items():
        torch.testing.assert_close(merged.norm.state_dict()[name], tensor, rtol=1e-9, atol=1e-9)
    with torch.no_grad():  # the head's inputs are collinear: its weights are not unique
        torch.testing.assert_close(merged(x), model(x), rtol=1e-7, atol=1e-7)


def test_only_rms_norms_are_taken_for_rms_norms():
    from ccamerge.maths.refit.hooked import _rms_eps

    assert _rms_eps(_LlamaStyleNorm(6)) == 1e-6 and _rms_eps(nn.RMSNorm(6, eps=1e-5)) == 1e-5
    assert _rms_eps(_LlamaStyleNorm(6, offset=True)) is None  # Gemma's (1 + weight)
    assert _rms_eps(nn.LayerNorm(6, bias=False)) is None and _rms_eps(nn.Linear(6, 6)) is None


def test_chunking_does_not_change_the_fit():
    """In float64 (float32 rounding would move the weights along ill-determined directions)."""
    models = [_net("resnet_cifar", s)[0].double() for s in (0, 1)]
    spec, shape = _net("resnet_cifar", 0)[1:]
    alignment = identity_alignment(spec, 2)
    x = torch.randn(40, *shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    results = []
    for size in (40, 7):
        merged = _merged(models, spec, alignment, [0.5, 0.5])
        refit(merged, models, spec, alignment, [0.5, 0.5], _batches(x, size))
        results.append(merged.state_dict())
    for k, v in results[0].items():
        if v.is_floating_point():
            torch.testing.assert_close(results[1][k], v, rtol=1e-9, atol=1e-9, msg=k)


def _conv_bn(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return _randomise_norms(
        nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3)), seed
    ).double()


def test_batchnorm_write_back():
    """Conv + BN fitted as one affine map: in eval mode the pair computes the least-squares
    fit W x + b exactly, and its running statistics are what a one-batch reset measures."""
    models = [_conv_bn(0), _conv_bn(1)]
    b = SpecBuilder()
    b.writes("c", 3, "0")
    b.norm("c", 3, "1")
    b.collect("c", "1")
    spec = b.build()
    alignment = identity_alignment(spec, 2)
    merged = _merged(models, spec, alignment, [0.5, 0.5])
    x = torch.randn(20, 2, 5, 5, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    report = refit(
        merged, models, spec, alignment, [0.5, 0.5], _batches(x, 6), RefitSettings(ridge=0.0)
    )
    assert [(layer.name, layer.norm, layer.inputs) for layer in report.layers] == [("0", "1", 19)]
    # the plain least-squares fit of the mean output on the patches, computed directly
    patches = nn.functional.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 18)
    X = torch.cat([patches, torch.ones(len(patches), 1, dtype=torch.float64)], 1)
    with torch.no_grad():
        T = (0.5 * (models[0](x) + models[1](x))).flatten(2).transpose(1, 2).reshape(-1, 3)
        WT = torch.linalg.lstsq(X, T).solution
        out = merged(x).flatten(2).transpose(1, 2).reshape(-1, 3)
    torch.testing.assert_close(out, X @ WT, rtol=1e-9, atol=1e-9)
    reset = copy.deepcopy(merged)
    reset_batchnorm(reset, [x])
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(
            getattr(merged[1], name), getattr(reset[1], name), rtol=1e-10, atol=1e-12
        )
    assert not merged[0].bias.detach().any()  # the BN's shift carries the bias


def test_stored_and_recompute_modes_agree():
    models = [_net("resnet_cifar", s)[0] for s in (0, 1)]
    spec, shape = _net("resnet_cifar", 0)[1:]
    alignment = identity_alignment(spec, 2)
    x = torch.randn(24, *shape, generator=torch.Generator().manual_seed(7))
    results, calls = [], []
    for budget in (None, 1):
        merged = _merged(models, spec, alignment, [0.5, 0.5])
        report = refit(
            merged,
            models,
            spec,
            alignment,
            [0.5, 0.5],
            _batches(x, 10),
            settings=RefitSettings(memory_budget=budget),
            on_layer=lambda *a: calls.append(a),
        )
        results.append((report, merged.state_dict()))
    assert [r.mode for r, _ in results] == ["stored", "recompute"]
    for k, v in results[0][1].items():
        assert torch.equal(results[1][1][k], v), k
    n = len(results[0][0].layers)
    assert calls[:n] == [(layer.name, i + 1, n) for i, layer in enumerate(results[0][0].layers)]


def test_residual_never_above_the_average():
    """Two unrelated networks: the fit is the least-squares optimum with the average as
    prior, so per layer its calibration residual is at most the average's."""
    for arch in ("mlp", "resnet_cifar"):
        models = [_net(arch, s)[0] for s in (0, 1)]
        spec, shape = _net(arch, 0)[1:]
        alignment = identity_alignment(spec, 2)
        merged = _merged(models, spec, alignment, [0.5, 0.5])
        x = torch.randn(32, *shape, generator=torch.Generator().manual_seed(8))
        report = refit(
            merged, models, spec, alignment, [0.5, 0.5], _batches(x, 32), RefitSettings(ridge=0.1)
        )
        assert any(layer.residual_before > 0.01 for layer in report.layers)
        for layer in report.layers:
            assert layer.residual_after <= layer.residual_before, layer


class _Grouped(nn.Module):
    def __init__(self, padding_mode: str = "zeros") -> None:
        super().__init__()
        self.grouped = nn.Conv2d(4, 4, 3, padding=1, groups=2, padding_mode=padding_mode)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 3, 1)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.grouped(x))))


def test_layer_that_cannot_be_refitted_keeps_its_weights():
    """A reflect-padded conv keeps its averaged weights (with a warning); the BatchNorm
    after it gets the running statistics a reset measures; the head is refitted."""
    models = [_randomise_norms(_Grouped("reflect"), seed) for seed in (0, 1)]
    spec = MergeSpec(())
    merged = _merged(models, spec, identity_alignment(spec, 2), [0.5, 0.5])
    kept = merged.grouped.weight.clone()
    x = torch.randn(8, 4, 6, 6)
    report = refit(merged, models, spec, identity_alignment(spec, 2), [0.5, 0.5], _batches(x, 3))
    assert torch.equal(merged.grouped.weight, kept)
    assert [layer.name for layer in report.layers] == ["head"]
    assert any(
        "layer grouped keeps its averaged weights" in w and "reflect" in w for w in report.warnings
    )
    reset = copy.deepcopy(merged)
    reset_batchnorm(reset, [x])
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(merged.bn, name), getattr(reset.bn, name))


def test_grouped_conv_is_refitted_per_group():
    """Two copies of one network, the merge started from perturbed weights: with almost
    no ridge, fitting each conv group (its BatchNorm folded) gives the network back."""
    model = _randomise_norms(_Grouped(), 0).double()
    x = torch.randn(16, 4, 6, 6, dtype=torch.float64)
    reset_batchnorm(model, [x])
    model.eval()
    spec = MergeSpec(())
    merged = copy.deepcopy(model)
    with torch.no_grad():
        for p in (merged.grouped.weight, merged.head.weight):
            p.add_(0.3 * torch.randn_like(p))
    settings = RefitSettings(ridge=1e-9)
    report = refit(
        merged, [model, model], spec, identity_alignment(spec, 2), [0.5, 0.5], _batches(x, 4),
        settings,
    )  # fmt: skip
    assert [layer.name for layer in report.layers] == ["grouped", "head"]
    assert report.layers[0].residual_after < 1e-12 < report.layers[0].residual_before
    torch.testing.assert_close(merged.eval()(x), model(x), rtol=1e-6, atol=1e-6)


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else -self.fc(x)


def test_an_untraceable_model_is_refitted_through_module_hooks():
    """torch.fx cannot trace data-dependent control flow: the refit then runs layer by
    layer through module hooks (and says so); a merge of a model with itself stays put."""
    torch.manual_seed(0)
    models = [_Untraceable() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    spec = MergeSpec(())
    merged = _Untraceable()
    merged.load_state_dict(models[0].state_dict())
    report = refit(
        merged,
        models,
        spec,
        identity_alignment(spec, 2),
        [0.5, 0.5],
        _batches(torch.randn(8, 3), 4),
    )
    assert report.mode == "module hooks" and [x.name for x in report.layers] == ["fc"]
    assert "torch.fx cannot trace _Untraceable.forward" in report.warnings[0]
    torch.testing.assert_close(merged.fc.weight, models[0].fc.weight, rtol=1e-5, atol=1e-6)


def test_an_untraceable_model_with_batchnorm_is_a_clear_error():
    """Module hooks cannot give BatchNorms honest statistics: that refit is refused."""
    models = [_Branchy().eval() for _ in range(2)]
    spec = MergeSpec(())
    with pytest.raises(RefitError, match="torch.fx cannot trace _Branchy.forward"):
        refit(
            models[0], models, spec, identity_alignment(spec, 2), [0.5, 0.5],
            _batches(torch.randn(4, 4), 4),
        )  # fmt: skip


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        y = self.bn(self.fc(x))
        return y if y.sum() > 0 else -y


class _WithOpaque(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = _Branchy()
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.relu(self.inner(x)))


def test_untraceable_submodule_is_an_opaque_leaf():
    """A submodule torch.fx cannot trace keeps its averaged weights (with a warning), its
    BatchNorm is reset on its merged inputs, and the rest of the network is refitted."""
    torch.manual_seed(0)
    models = [_WithOpaque().eval() for _ in range(2)]
    spec = MergeSpec(())
    alignment = identity_alignment(spec, 2)
    merged = _merged(models, spec, alignment, [0.5, 0.5])
    kept = merged.inner.fc.weight.clone()
    x = torch.randn(16, 4)
    report = refit(merged, models, spec, alignment, [0.5, 0.5], _batches(x, 16))
    assert [layer.name for layer in report.layers] == ["head"]
    assert any("module inner (_Branchy) cannot be traced" in w for w in report.warnings)
    assert torch.equal(merged.inner.fc.weight, kept)
    reset = copy.deepcopy(merged)
    reset_batchnorm(reset.inner, [x])
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(merged.inner.bn, name), getattr(reset.inner.bn, name))


def test_row_limit_fits_on_the_first_samples_of_every_chunk():
    """With ``max_rows``, a layer with more rows than that is fitted on the first samples
    of each chunk (its report counts exactly those rows); the permuted-copy identity still
    holds, since the targets are exact and the kept rows outnumber the inputs."""
    model, permuted, spec, alignment, x = _with_permuted_copy("resnet_cifar", 3)
    model, permuted, x = model.double(), permuted.double(), x.double()
    chunk = 16
    max_rows = x.shape[0] * 64  # 64 rows a sample: layers with more positions are limited
    merged = _merged([model, permuted], spec, alignment, [0.5, 0.5])
    _damage(merged, 2)
    report = refit(
        merged,
        [model, permuted],
        spec,
        alignment,
        [0.5, 0.5],
        _batches(x, chunk),
        settings=RefitSettings(ridge=1e-9, max_rows=max_rows),
    )
    sizes = [len(c) for c in torch.split(x, chunk)]
    with torch.no_grad():
        positions = {
            name: out.shape[2] * out.shape[3] if out.dim() == 4 else 1
            for name, out in _layer_outputs(model, x[:1]).items()
        }
    limited = 0
    for layer in report.layers:
        per = positions[layer.name]
        kept = [min(n, -(-n * 64 // per)) if per > 64 else n for n in sizes]
        assert layer.samples == sum(kept) * per, layer
        limited += per > 64
    assert limited > 0 and report.max_rows == max_rows
    with torch.no_grad():
        original = model(x)
        error = float((merged(x) - original).abs().max())
    assert error < 2e-5 * float(original.abs().max())


def _layer_outputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    outputs, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            hooks.append(
                m.register_forward_hook(lambda _m, _i, o, n=name: outputs.__setitem__(n, o))
            )
    model(x)
    for h in hooks:
        h.remove()
    return outputs


def test_memory_budget_is_half_the_free_memory_of_the_device(monkeypatch):
    """Stored activations live on the merge's device: a CUDA device's budget is half its
    free GPU memory (not the RAM), a CPU's half the available RAM."""
    monkeypatch.setattr(refit_memory, "available_memory", lambda: 10 * 2**30)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (3 * 2**30, 80 * 2**30))
    assert default_memory_budget(torch.device("cpu")) == 5 * 2**30
    assert default_memory_budget(torch.device("cuda", 0)) == 3 * 2**29
    monkeypatch.setattr(refit_memory, "available_memory", lambda: None)
    assert default_memory_budget(torch.device("cpu")) is None
