"""Registry entries: detection, building and feature-group specs.

The first part is parametrized over the registry: every entry's
``example_config()`` is built, detected back, and its spec is checked
(permutation invariance, collection points, no hidden axis left ungrouped).
A new entry is covered without new test code, and fails loudly if it has no
``example_config``.

The second part checks detection against reference implementations of each
layout written here, independently of the package (pytorch-cifar's VGG, the
common CIFAR ResNet with option A/B shortcuts, torchvision's ResNet), at
several depths and widths: the detected config, the built module's tensors
and its outputs must match the reference exactly.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ccamerge.maths.algebra import permute_state_dict, random_permutations
from ccamerge.models.archs.resnet_cifar import cifar_resnet_config
from ccamerge.models.archs.resnet_tv import tv_resnet_config
from ccamerge.models.archs.vgg import vgg_config
from ccamerge.models.registry import (
    NotThisArchitecture,
    detect_architecture,
    get_architecture,
    list_architectures,
)
from ccamerge.models.spec import FeatureGroup, MergeSpec
from ccamerge.runtime.errors import ArchitectureError

_BN = (nn.BatchNorm1d, nn.BatchNorm2d)

# Entries whose groups are all read after a ReLU (docs/cca.md, 'Feature groups').
_POST_RELU = {"mlp", "vgg", "resnet_cifar", "resnet"}


def example_config(name: str) -> dict[str, Any]:
    arch = get_architecture(name)
    fn = getattr(arch, "example_config", None)
    if fn is not None:
        return fn()
    pytest.fail(f"architecture {name!r} has no example_config(); see docs/architectures.md")


def example_input_shape(name: str, config: dict[str, Any]) -> tuple[int, ...]:
    arch = get_architecture(name)
    shape = arch.input_shape(config) if hasattr(arch, "input_shape") else None
    if shape is None and hasattr(arch, "example_input_shape"):
        shape = arch.example_input_shape(config)
    if shape is None:
        pytest.fail(f"architecture {name!r}: input_shape() is None and no example_input_shape()")
    return tuple(shape)


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """float64, random weights, non-trivial BatchNorm affine and running stats, eval."""
    gen = torch.Generator().manual_seed(seed)
    model = model.double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BN):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=gen, dtype=torch.float64) + 0.5)
                m.bias.copy_(0.1 * torch.randn(c, generator=gen, dtype=torch.float64))
                m.running_mean.copy_(0.1 * torch.randn(c, generator=gen, dtype=torch.float64))
                m.running_var.copy_(torch.rand(c, generator=gen, dtype=torch.float64) + 0.5)
    return model.eval()


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-10) -> bool:
    return a.shape == b.shape and float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max()))


# A case: (architecture name, config, input shape)
def _registry_cases() -> list[Any]:
    cases = []
    for name in list_architectures():
        cases.append(pytest.param(name, None, id=f"{name}-example"))
    extra = [
        ("vgg", vgg_config((1, 2, 1), (4, 6, 8), batch_norm=False, conv_bias=False), "vgg-nobn"),
        ("resnet_cifar", cifar_resnet_config(20, shortcut_kernel=3, base=4), "resnet20-3x3"),
        ("resnet", tv_resnet_config(18, widths=(2, 3, 4, 5), num_classes=6), "resnet18"),
    ]
    cases += [pytest.param(n, c, id=i) for n, c, i in extra]
    return cases


def _case(name: str, config: dict[str, Any] | None):
    config = example_config(name) if config is None else config
    arch = get_architecture(name)
    model = randomise(arch.build(config))
    x = torch.randn(
        3,
        *example_input_shape(name, config),
        dtype=torch.float64,
        generator=torch.Generator().manual_seed(1),
    )
    return arch, config, model, x


# --------------------------------------------------------------------------
# parametrized over the registry


@pytest.mark.parametrize("name", list_architectures())
def test_example_config_is_detected_back(name: str) -> None:
    config = example_config(name)
    arch = get_architecture(name)
    sd = arch.build(config).state_dict()
    detected = detect_architecture(sd)
    assert detected.name == name
    assert detected.config == config
    assert detect_architecture(sd, name=name).config == config
    # exactly one entry accepts it
    accepted = []
    for other in list_architectures():
        try:
            get_architecture(other).detect(sd)
            accepted.append(other)
        except NotThisArchitecture:
            pass
    assert accepted == [name]


@pytest.mark.parametrize("name, config", _registry_cases())
def test_spec_fits_model(name: str, config: dict[str, Any] | None) -> None:
    arch, config, model, x = _case(name, config)
    spec = arch.spec(config)
    sd = model.state_dict()
    spec.validate(sd)
    assert spec.groups

    # only the network's input and its logits are left out of every group
    n_out = run(model, x).shape[1]
    n_in = x.shape[1]
    for tensor, t in sd.items():
        if not t.is_floating_point() or t.ndim == 0:
            continue
        axes = spec.axes.get(tensor, {})
        if 0 not in axes:
            assert t.shape[0] == n_out, f"{tensor} axis 0 is in no group"
        if t.ndim >= 2 and 1 not in axes:
            assert t.shape[1] == n_in, f"{tensor} axis 1 is in no group"

    # collection points exist, fire once per forward, and carry the group's channels
    modules = dict(model.named_modules())
    seen: dict[str, list[tuple[int, ...]]] = {g.name: [] for g in spec.groups}
    handles = []
    for g in spec.groups:
        assert g.collect_at in modules, f"{g.name}: no module {g.collect_at!r}"
        mod = modules[g.collect_at]

        def store(t: torch.Tensor, g: FeatureGroup = g) -> None:
            seen[g.name].append(tuple(t.shape))
            if name in _POST_RELU:
                assert float(t.min()) >= 0, f"{g.name}: {g.collect_at} is not after a ReLU"

        if g.collect_on == "input":
            handles.append(mod.register_forward_pre_hook(lambda _m, a, s=store: s(a[0])))
        else:
            handles.append(mod.register_forward_hook(lambda _m, _a, o, s=store: s(o)))
        for bn in g.norms:
            assert isinstance(modules[bn], _BN), f"{g.name}: {bn} is not a BatchNorm"
            assert modules[bn].num_features == g.size
    run(model, x)
    for h in handles:
        h.remove()
    for g in spec.groups:
        assert len(seen[g.name]) == 1, f"{g.collect_at} fired {len(seen[g.name])} times"
        assert seen[g.name][0][1] == g.size, f"{g.name}: activations {seen[g.name][0]}"

    # every BatchNorm of the model is registered as a norm of some group
    bns = {n for n, m in modules.items() if isinstance(m, _BN)}
    assert bns == {bn for g in spec.groups for bn in g.norms}


@pytest.mark.parametrize("name, config", _registry_cases())
def test_permuting_every_group_keeps_the_function(name: str, config: dict[str, Any] | None) -> None:
    arch, config, model, x = _case(name, config)
    spec = arch.spec(config)
    sd = model.state_dict()
    y = run(model, x)
    for seed in (0, 1):
        permuted = permute_state_dict(sd, spec, random_permutations(spec, seed))
        assert permuted.keys() == sd.keys()
        model.load_state_dict(permuted)
        assert close(run(model, x), y)
    model.load_state_dict(sd)

    # the check can fail: moving only the units a group's writers produce
    # (readers left alone) changes the outputs, for every group
    for g in spec.groups:
        writers = tuple(m for m in g.members if m[1] == 0)
        half = MergeSpec((FeatureGroup(g.name, g.size, writers, g.collect_at, g.collect_on),))
        shift = torch.roll(torch.arange(g.size), 1)
        model.load_state_dict(permute_state_dict(sd, half, {g.name: shift}))
        assert not close(run(model, x), y, tol=1e-6), f"group {g.name} does not matter"
    model.load_state_dict(sd)


# --------------------------------------------------------------------------
# reference implementations of each layout (independent of the package)


class RefVGG(nn.Module):
    """pytorch-cifar's VGG."""

    def __init__(self, cfg: list[Any], bn: bool, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for x in cfg:
            if x == "M":
                layers += [nn.MaxPool2d(kernel_size=2, stride=2)]
            else:
                layers += [nn.Conv2d(c, x, kernel_size=3, padding=1)]
                layers += [nn.BatchNorm2d(x)] if bn else []
                layers += [nn.ReLU(inplace=True)]
                c = x
        layers += [nn.AvgPool2d(kernel_size=1, stride=1)]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.features(x)
        return self.classifier(out.view(out.size(0), -1))


class _Lambda(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


class RefCifarBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, option: str, k: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Sequential()
        if stride != 1 or in_planes != planes:
            if option == "A":
                pad = (planes - in_planes) // 2
                self.shortcut = _Lambda(lambda x: F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, pad, pad)))
            else:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, planes, k, stride=stride, padding=k // 2, bias=False),
                    nn.BatchNorm2d(planes),
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out)


class RefCifarResNet(nn.Module):
    def __init__(
        self, n: list[int], base: int, option: str = "B", k: int = 1, num_classes: int = 10
    ) -> None:
        super().__init__()
        self.in_planes = base
        self.conv1 = nn.Conv2d(3, base, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        self.n_stages = len(n)
        for s, blocks in enumerate(n):
            planes = base * 2**s
            strides = [1 if s == 0 else 2] + [1] * (blocks - 1)
            layers = []
            for stride in strides:
                layers.append(RefCifarBlock(self.in_planes, planes, stride, option, k))
                self.in_planes = planes
            setattr(self, f"layer{s + 1}", nn.Sequential(*layers))
        self.linear = nn.Linear(self.in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        for s in range(self.n_stages):
            out = getattr(self, f"layer{s + 1}")(out)
        out = F.avg_pool2d(out, out.size()[3])
        return self.linear(out.view(out.size(0), -1))


class TVBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, base_width=64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TVBottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, base_width=64) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0))
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class RefTVResNet(nn.Module):
    """torchvision.models.ResNet's structure, with the widths as parameters."""

    def __init__(self, block, layers, widths, stem, num_classes=1000, width_per_group=64):
        super().__init__()
        self.inplanes = stem
        self.base_width = width_per_group
        self.conv1 = nn.Conv2d(3, stem, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, widths[0], layers[0])
        self.layer2 = self._make_layer(block, widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(block, widths[2], layers[2], stride=2)
        self.layer4 = self._make_layer(block, widths[3], layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[3] * block.expansion, num_classes)

    def _make_layer(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample, self.base_width)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, base_width=self.base_width))
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


_TV_LAYERS = {
    18: (TVBasicBlock, [2, 2, 2, 2]),
    34: (TVBasicBlock, [3, 4, 6, 3]),
    50: (TVBottleneck, [3, 4, 6, 3]),
    101: (TVBottleneck, [3, 4, 23, 3]),
    152: (TVBottleneck, [3, 8, 36, 3]),
}


def check_against_reference(ref: nn.Module, expected: dict[str, Any], name: str, side: int):
    """Detect ref's checkpoint, compare config, tensors and (if side) outputs."""
    ref = randomise(ref, seed=3)
    sd = ref.state_dict()
    detected = detect_architecture(sd)
    assert detected.name == name
    assert detected.config == expected
    model = detected.build().double()
    built = model.state_dict()
    assert list(built) == list(sd)  # same names, same order
    assert {k: v.shape for k, v in built.items()} == {k: v.shape for k, v in sd.items()}
    if side:
        model.load_state_dict(sd, strict=True)
        model.eval()
        x = torch.randn(
            2, 3, side, side, dtype=torch.float64, generator=torch.Generator().manual_seed(2)
        )
        assert close(run(model, x), run(ref, x), tol=1e-12)
    return sd


# --------------------------------------------------------------------------
# detection against the references


@pytest.mark.parametrize("bn", [True, False])
@pytest.mark.parametrize("depth, convs", [(11, (1, 1, 2, 2, 2)), (13, (2, 2, 2, 2, 2))])
@pytest.mark.parametrize("div", [16, 32])
def test_vgg_detected(bn: bool, depth: int, convs: tuple[int, ...], div: int) -> None:
    widths = tuple(w // div for w in (64, 128, 256, 512, 512))
    cfg: list[Any] = []
    for n, w in zip(convs, widths):
        cfg += [w] * n + ["M"]
    expected = vgg_config(convs, widths, batch_norm=bn, num_classes=10)
    assert expected["depth"] == depth
    check_against_reference(RefVGG(cfg, bn), expected, "vgg", side=32)
    assert get_architecture("vgg").input_shape(expected) == (3, 32, 32)


@pytest.mark.parametrize("depth", [20, 32])
@pytest.mark.parametrize("width", [1, 2])
@pytest.mark.parametrize("k", [1, 3])
def test_cifar_resnet_detected(depth: int, width: int, k: int) -> None:
    n = (depth - 2) // 6
    ref = RefCifarResNet([n] * 3, 16 * width, option="B", k=k)
    expected = cifar_resnet_config(depth, width=width, shortcut_kernel=k)
    assert expected["widths"] == [16 * width, 32 * width, 64 * width]
    check_against_reference(ref, expected, "resnet_cifar", side=32 if depth == 20 else 0)


def test_cifar_resnet18_with_four_stages_detected() -> None:
    ref = RefCifarResNet([2, 2, 2, 2], 4, option="B", k=1, num_classes=6)
    expected = cifar_resnet_config(18, base=4, num_stages=4, num_classes=6)
    check_against_reference(ref, expected, "resnet_cifar", side=32)


def test_cifar_resnet_option_a_is_refused() -> None:
    ref = RefCifarResNet([1, 1, 1], 4, option="A")
    x = torch.randn(2, 3, 8, 8)
    ref.eval()(x)  # the reference itself runs
    with pytest.raises(ArchitectureError, match=r"option A.*not supported"):
        detect_architecture(ref.state_dict())


@pytest.mark.parametrize(
    "depth, widths, stem, side",
    [
        (18, (2, 3, 4, 5), 4, 64),
        (18, (4, 8, 16, 32), 4, 0),
        (34, (2, 3, 4, 5), 2, 0),
        (50, (2, 3, 4, 5), 4, 64),
        (101, (1, 2, 2, 2), 2, 0),
        (152, (1, 1, 1, 1), 2, 0),
    ],
)
def test_torchvision_resnet_detected(depth, widths, stem, side) -> None:
    block, layers = _TV_LAYERS[depth]
    ref = RefTVResNet(block, layers, widths, stem, num_classes=9)
    expected = tv_resnet_config(depth, widths=widths, stem_width=stem, num_classes=9)
    assert expected["depth"] == depth
    assert expected["block"] == ("basic" if block is TVBasicBlock else "bottleneck")
    check_against_reference(ref, expected, "resnet", side=side)


def test_wide_torchvision_resnet_detected() -> None:
    ref = RefTVResNet(
        TVBottleneck, [3, 4, 6, 3], (2, 3, 4, 5), 4, num_classes=9, width_per_group=128
    )
    expected = tv_resnet_config(
        50, widths=(2, 3, 4, 5), stem_width=4, num_classes=9, width_per_group=128
    )
    assert expected["blocks"][0]["channels"] == [4, 4, 4, 8]
    check_against_reference(ref, expected, "resnet", side=32)


def test_missing_num_batches_tracked_is_accepted() -> None:
    ref = randomise(RefCifarResNet([1, 1, 1], 4))
    sd = {k: v for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")}
    detected = detect_architecture(sd)
    model = detected.build().double()
    model.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    assert close(run(model.eval(), x), run(ref, x))


# --------------------------------------------------------------------------
# checkpoints that fit nothing


def _vgg_sd(bn: bool = True) -> dict[str, torch.Tensor]:
    return RefVGG([4, "M", 8, "M", 8, "M", 8, "M", 8, "M"], bn).state_dict()


def test_vgg_with_wrong_kernel_names_closest_entry() -> None:
    sd = _vgg_sd()
    sd["features.0.weight"] = torch.zeros(4, 3, 5, 5)
    with pytest.raises(ArchitectureError, match=r"closest is 'vgg'.*5x5"):
        detect_architecture(sd)


def test_vgg_with_spatial_flatten_is_refused() -> None:
    sd = _vgg_sd()
    sd["classifier.weight"] = torch.zeros(10, 8 * 4)
    with pytest.raises(ArchitectureError, match=r"closest is 'vgg'.*1x1"):
        detect_architecture(sd)


def test_extra_tensor_names_closest_entry() -> None:
    sd = RefCifarResNet([1, 1, 1], 4).state_dict()
    sd["layer1.0.extra.weight"] = torch.zeros(3)
    with pytest.raises(ArchitectureError, match=r"closest is 'resnet_cifar'.*layer1\.0\.extra"):
        detect_architecture(sd)


def test_grouped_torchvision_resnet_is_refused() -> None:
    sd = RefTVResNet(TVBottleneck, [1, 1, 1, 1], (4, 4, 4, 4), 4).state_dict()
    sd["layer1.0.conv2.weight"] = torch.zeros(4, 2, 3, 3)  # groups=2
    with pytest.raises(ArchitectureError, match=r"closest is 'resnet'.*grouped"):
        detect_architecture(sd)


def test_unrelated_checkpoint_is_refused() -> None:
    sd = {"encoder.weight": torch.zeros(3, 3), "decoder.weight": torch.zeros(3, 3)}
    with pytest.raises(ArchitectureError, match="no registered architecture fits"):
        detect_architecture(sd)
