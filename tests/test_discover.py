"""Feature-group discovery by torch.fx tracing (ccamerge.models.discover).

* A zoo of small models written the way users write them (functional ReLU,
  ``x + f(x)``, LayerNorm, dropout, concatenation, grouped convs, tied
  weights, untraceable submodules...): permuting every discovered group of a
  random float64 model must leave its outputs unchanged, and what discovery
  cannot prove safe must be left out, with a warning that names it.
* The registry's hand-written specs must agree with discovery: same members,
  same norms, and collection points that capture the same activations.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ccamerge.maths.algebra import permute_state_dict, random_permutations
from ccamerge.models.archs.vgg import vgg_config
from ccamerge.models.discover import discover
from ccamerge.models.registry import get_architecture, list_architectures
from ccamerge.models.spec import FeatureGroup, MergeSpec
from ccamerge.runtime.errors import SpecError

# --------------------------------------------------------------------------
# the zoo


class LayerNormMLP(nn.Module):
    """LayerNorm before and after the nonlinearity; functional and method forms."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 10)
        self.ln1 = nn.LayerNorm(10)
        self.fc2 = nn.Linear(10, 8)
        self.ln2 = nn.LayerNorm(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.ln1(self.fc1(x.flatten(1))))
        x = self.ln2(torch.tanh(self.fc2(x)))
        return self.head(x.sigmoid() * 2.0)


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class Down(nn.Module):
    """Stride-2 residual block with a 1x1 conv shortcut; ``+=`` in place."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.bn = nn.BatchNorm2d(c_out)
        self.proj = nn.Conv2d(c_in, c_out, 1, stride=2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn(self.conv2(F.leaky_relu(self.conv1(x), 0.1)))
        out += self.proj(x)
        return out.relu()


class ResConvNet(nn.Module):
    """Residual blocks written differently from ccamerge's ResNets."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.blocks = nn.Sequential(Block(6), Down(6, 8), Block(8))
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        return self.head(self.blocks(x).mean((2, 3)))


class ConcatNet(nn.Module):
    """Two branches concatenated: both stay untransformed, the rest is merged."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(12, 6)
        self.b = nn.Linear(12, 4)
        self.mix = nn.Linear(10, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([F.relu(self.a(x)), torch.sigmoid(self.b(x))], dim=1)
        return self.head(F.relu(self.mix(h)))


class DropoutNet(nn.Module):
    """Dropout in module and functional form, channel dropout, pools, a 1x1 view."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 5, 3, padding=1)
        self.drop2d = nn.Dropout2d(0.2)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(5, 7, 3, padding=1)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(7, 9)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(9, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.drop2d(F.relu(self.conv1(x))))
        x = self.gap(F.silu(self.conv2(x)))
        x = F.dropout(x.view(x.size(0), -1), 0.3, self.training)  # a size query on the group
        return self.head(self.drop(self.act(self.fc(x))))


class SpatialFlattenNet(nn.Module):
    """A conv feature map of 4x4 positions flattened into a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv(x)).view(x.size(0), -1)
        return self.head(F.relu(self.fc(x)))


class GroupedConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.conv2 = nn.Conv2d(8, 6, 1)
        self.head = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.dw(F.relu(self.conv1(x))))
        x = F.relu(self.conv2(x))
        return self.head(F.adaptive_avg_pool2d(x, 1).reshape(x.shape[0], -1))


class TiedNet(nn.Module):
    """``l2`` shares ``l1``'s weight; ``twice`` is applied twice."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(12, 8)
        self.l1 = nn.Linear(8, 8)
        self.l2 = nn.Linear(8, 8)
        self.l2.weight = self.l1.weight
        self.mid = nn.Linear(8, 6)
        self.twice = nn.Linear(6, 6)
        self.head = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.l2(F.relu(self.l1(F.relu(self.inp(x))))))
        x = F.relu(self.mid(x))
        return self.head(F.relu(self.twice(F.relu(self.twice(x)))))


class Gate(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace this."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.fc(x)
        return -x


class GatedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(12, 8)
        self.gate = Gate()
        self.fc = nn.Linear(8, 7)
        self.head = nn.Linear(7, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.gate(F.relu(self.inp(x)))
        return self.head(F.relu(self.fc(F.relu(x))))


class AttentionNet(nn.Module):
    """Tokens (B, 4, 6): per-token Linear layers feed a matmul."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(6, 8)
        self.k = nn.Linear(6, 8)
        self.v = nn.Linear(6, 8)
        self.fc = nn.Linear(8, 7)
        self.head = nn.Linear(7, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        att = torch.softmax(self.q(x) @ self.k(x).transpose(1, 2), dim=-1)
        h = (att @ self.v(x)).mean(1)
        return self.head(F.relu(self.fc(h)))


class Pinned(nn.Module):
    """A hidden layer that is added to the output: it must stay untransformed."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 9)
        self.fc2 = nn.Linear(9, 5)
        self.skip = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x))) + self.skip(x)


# --------------------------------------------------------------------------
# helpers


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """float64, eval, random weights and non-trivial norm parameters and statistics."""
    gen = torch.Generator().manual_seed(seed)
    model = model.double().eval()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            values = torch.randn(t.shape, generator=gen, dtype=torch.float64)
            if name.endswith("running_var"):
                values = values.abs() + 0.5
            t.copy_(0.5 * values if t.ndim <= 1 else values / t[0].numel() ** 0.5)
    return model


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def permuted_copy(model: nn.Module, spec: MergeSpec, seed: int = 1) -> nn.Module:
    other = copy.deepcopy(model)
    sd = model.state_dict()
    permuted = permute_state_dict(sd, spec, random_permutations(spec, seed))
    assert any(not torch.equal(permuted[k], sd[k]) for k in sd), "nothing was permuted"
    other.load_state_dict(permuted)
    return other


def sample(shape: tuple[int, ...], n: int = 5) -> torch.Tensor:
    return torch.randn(n, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-10) -> bool:
    return float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max()))


ZOO = {
    "layernorm_mlp": (LayerNormMLP, (3, 4)),
    "residual_convnet": (ResConvNet, (3, 8, 8)),
    "concat": (ConcatNet, (12,)),
    "dropout": (DropoutNet, (3, 8, 8)),
    "spatial_flatten": (SpatialFlattenNet, (3, 4, 4)),
    "grouped_conv": (GroupedConvNet, (3, 6, 6)),
    "gated_untraceable": (GatedNet, (12,)),
    "attention": (AttentionNet, (4, 6)),
    "pinned_to_output": (Pinned, (12,)),
}

# what discovery must find: group name -> size (every other Linear/Conv stays untransformed)
EXPECTED_GROUPS = {
    "layernorm_mlp": {"fc1": 10, "fc2": 8},
    "residual_convnet": {"stem": 6, "blocks.0.conv1": 6, "blocks.1.conv1": 8, "blocks.1.conv2": 8,
                         "blocks.2.conv1": 8},
    "concat": {"a": 6, "b": 4, "mix": 8},
    "dropout": {"conv1": 5, "conv2": 7, "fc": 9},
    "spatial_flatten": {"fc": 8},
    "grouped_conv": {"conv1": 8, "conv2": 6},
    "gated_untraceable": {"fc": 7},
    "attention": {"fc": 7},
    "pinned_to_output": {"fc1": 9},
}  # fmt: skip

# a word that each warning about the unsafe part must contain
EXPECTED_WARNING = {
    "spatial_flatten": "flattens 4 channels x 16 positions",
    "gated_untraceable": "module gate (Gate) could not be traced",
    "attention": "matmul",
}


# --------------------------------------------------------------------------
# the zoo: invariance, what is grouped, what is left alone


@pytest.mark.parametrize("name", list(ZOO))
def test_permuting_discovered_groups_keeps_outputs(name: str) -> None:
    cls, shape = ZOO[name]
    model = randomise(cls())
    found = discover(model, shape)
    assert {g.name: g.size for g in found.spec.groups} == EXPECTED_GROUPS[name]
    x = sample(shape)
    if found.spec.groups:
        other = permuted_copy(model, found.spec)
        assert close(outputs(other, x), outputs(model, x))
    if name in EXPECTED_WARNING:
        assert any(EXPECTED_WARNING[name] in w for w in found.warnings), found.warnings


def test_wrong_spec_is_caught_by_the_invariance_check() -> None:
    """The check above can fail: forget one member (fc2's input columns) and it does."""
    model = randomise(LayerNormMLP())
    spec = discover(model, (3, 4)).spec
    g = spec.group("fc1")
    broken = FeatureGroup(
        g.name, g.size, tuple(m for m in g.members if m != ("fc2.weight", 1)), g.collect_at
    )
    x = sample((3, 4))
    other = permuted_copy(model, MergeSpec((broken,)))
    assert not close(outputs(other, x), outputs(model, x), tol=1e-3)


def test_residual_streams_are_one_group_each() -> None:
    spec = discover(ResConvNet(), (3, 8, 8)).spec
    stem = {t for t, _ in spec.group("stem").members}
    assert {"stem.weight", "bn.weight", "blocks.0.conv2.weight", "blocks.0.bn2.running_var"} <= stem
    assert ("blocks.1.conv1.weight", 1) in spec.group("stem").members  # read by Down
    assert ("blocks.1.proj.weight", 1) in spec.group("stem").members
    # Down's output, its shortcut and the next block's output are tied by the additions
    stream = dict(spec.group("blocks.1.conv2").members)
    assert {"blocks.1.proj.weight", "blocks.2.conv2.weight", "blocks.2.bn2.bias"} <= set(stream)
    assert stream["head.weight"] == 1
    assert set(spec.group("stem").norms) == {"bn", "blocks.0.bn2"}  # bn1 is inside the block
    assert set(spec.group("blocks.1.conv2").norms) == {"blocks.1.bn", "blocks.2.bn2"}
    # streams are read after the ReLU that follows their last addition: the block outputs
    assert (spec.group("stem").collect_at, spec.group("stem").collect_on) == ("blocks.0", "output")
    assert spec.group("blocks.1.conv2").collect_at == "blocks.2"
    # inside a block: the input of the next conv (functional ReLU has no module)
    g = spec.group("blocks.0.conv1")
    assert (g.collect_at, g.collect_on) == ("blocks.0.conv2", "input")


def test_layernorm_joins_its_group() -> None:
    spec = discover(LayerNormMLP(), (3, 4)).spec
    assert set(spec.group("fc1").members) == {
        ("fc1.weight", 0),
        ("fc1.bias", 0),
        ("ln1.weight", 0),
        ("ln1.bias", 0),
        ("fc2.weight", 1),
    }
    assert spec.group("fc1").norms == ()  # no running statistics to recompute
    # LayerNorm after the nonlinearity: read what the next layer reads
    assert (spec.group("fc2").collect_at, spec.group("fc2").collect_on) == ("head", "input")


def test_untransformed_units_say_why() -> None:
    found = discover(ConcatNet(), (12,))
    reasons = {u.writers: u.reasons for u in found.untransformed}
    # the concatenation is made of its parts' groups (docs/custom-models.md)
    assert [c.parts for c in found.spec.concats] == [(("a", 6), ("b", 4))]
    assert reasons[("head",)] == ("it reaches the model's output",)
    # the expected case (the logits) gives no warning
    assert not any("head" in w for w in found.warnings)
    pinned = discover(Pinned(), (12,))
    assert {u.writers for u in pinned.untransformed} == {("fc2", "skip")}
    assert pinned.warnings == (
        "units written by fc2, skip stay untransformed: it reaches the model's output",
    )


def test_weight_sharing_leaves_both_uses_alone() -> None:
    found = discover(TiedNet(), (12,))
    # inp, l1, l2 touch the tied weight; mid and twice the module called twice
    assert found.spec.groups == ()
    text = " ".join(found.warnings)
    assert "l1.weight is shared with l2.weight" in text
    assert "called 2 times" in text


def test_collection_point_falls_back_to_a_view_with_a_warning() -> None:
    """No module sees relu(x + f(x)) here; the pooled view that the head reads is used."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 3, padding=1)
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.head = nn.Linear(4, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = F.relu(self.stem(x))
            x = F.relu(x + self.conv(x))
            return self.head(x.mean((2, 3)))

    found = discover(Net(), (3, 6, 6))
    g = found.spec.group("stem")
    assert (g.collect_at, g.collect_on) == ("head", "input")
    assert any("no module sees its activations" in w for w in found.warnings)


def test_input_shape_inferred_for_mlps_and_required_for_convnets() -> None:
    assert discover(ConcatNet()).input_shape == (12,)
    assert discover(LayerNormMLP()).input_shape == (12,)  # x.flatten(1) into fc1
    with pytest.raises(SpecError, match="cannot tell the input shape") as caught:
        discover(ResConvNet())
    assert caught.value.missing == "input_shape"
    with pytest.raises(SpecError, match=r"samples of shape \(7,\) failed"):
        discover(ConcatNet(), (7,))


def test_untraceable_model_is_a_clear_error() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) if x.sum() > 0 else -self.fc(x)

    with pytest.raises(SpecError, match=r"torch.fx cannot trace Net.forward") as caught:
        discover(Net(), (4,))
    assert caught.value.missing == "spec"  # each command says how to give one


def test_discovery_keeps_the_training_flag_and_weights() -> None:
    model = ResConvNet().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    discover(model, (3, 8, 8))
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------
# the registry agrees with discovery

_EXTRA_CONFIGS: dict[str, list[dict[str, Any]]] = {
    "mlp": [
        {"layout": "ccamerge", "indices": [0, 1, 2], "sizes": [12, 8, 6, 5], "bias": True},
        {"layout": "sequential", "indices": [0, 2, 5], "sizes": [12, 7, 6, 5], "bias": False},
    ],
    "vgg": [vgg_config((1, 2, 1), (4, 6, 8), batch_norm=False, conv_bias=False)],
}


def _registry_cases() -> list[Any]:
    cases = []
    for name in list_architectures():
        arch = get_architecture(name)
        configs = list(_EXTRA_CONFIGS.get(name, []))
        if hasattr(arch, "example_config"):
            configs.insert(0, arch.example_config())
        assert configs, f"no example config for {name}"
        cases += [pytest.param(name, c, id=f"{name}-{i}") for i, c in enumerate(configs)]
    return cases


def _captured(
    model: nn.Module, points: set[tuple[str, str]], x: torch.Tensor
) -> dict[tuple[str, str], torch.Tensor]:
    """What each (module, "input"/"output") hook sees in one forward pass (must fire once)."""
    seen: dict[tuple[str, str], list[torch.Tensor]] = {p: [] for p in points}
    handles = []
    for module, on in points:
        m = model.get_submodule(module)
        store = seen[(module, on)].append
        if on == "input":
            handles.append(m.register_forward_pre_hook(lambda _m, a, s=store: s(a[0].clone())))
        else:
            handles.append(m.register_forward_hook(lambda _m, _a, o, s=store: s(o.clone())))
    try:
        outputs(model, x)
    finally:
        for h in handles:
            h.remove()
    for point, values in seen.items():
        assert len(values) == 1, f"{point} fired {len(values)} times"
    return {point: values[0] for point, values in seen.items()}


@pytest.mark.parametrize("name,config", _registry_cases())
def test_registry_specs_agree_with_discovery(name: str, config: dict[str, Any]) -> None:
    arch = get_architecture(name)
    shape = arch.input_shape(config)
    if shape is None:
        shape = arch.example_input_shape(config)
    model = randomise(arch.build(config))
    registry = {frozenset(g.members): g for g in arch.spec(config).groups}
    found = discover(model, shape)
    assert found.warnings == ()
    discovered = {frozenset(g.members): g for g in found.spec.groups}
    assert set(discovered) == set(registry)
    pairs = [(g, registry[members]) for members, g in discovered.items()]
    points = {(s.collect_at, s.collect_on) for pair in pairs for s in pair}
    seen = _captured(model, points, sample(tuple(shape), n=2))
    for g, r in pairs:
        assert g.size == r.size
        assert set(g.norms) == set(r.norms), g.name
        a, b = seen[(g.collect_at, g.collect_on)], seen[(r.collect_at, r.collect_on)]
        assert a.shape == b.shape and torch.equal(a, b), f"{g.name} vs {r.name}"
