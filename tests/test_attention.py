"""Self-attention under ``--model`` (tests/attention_nets.py): torch.nn's attention layers
get traceable forwards that compute the same function; discovery aligns their heads, the
residual stream (embeddings, class token, position embeddings, layer scale) and the MLPs;
a transformer merged with a copy whose heads, units within heads, stream and MLP units
were moved (with ``gamma=0``: each head's value space mixed by a dense map, its query/key
space by an orthogonal one) is the original function again, with and without the refit."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from attention_nets import NETS, SHAPES, inputs, make_net
from moved import assert_merged_back, moved_state
from torch import nn

from ccamerge.models.attention import make_traceable
from ccamerge.models.discover import discover
from ccamerge.runs.merge import merge

FACTORY = f"{Path(__file__).parent / 'attention_nets.py'}:make_net"
ALIGNED = [name for name in NETS if name != "not_attention"]


def _discover(name: str, model: nn.Module):
    shape = SHAPES.get(name, inputs(name, 1, 0).shape[1:])
    return discover(model, tuple(shape), tokens=name == "token_lm")


@pytest.mark.parametrize("norm_first", [True, False])
@pytest.mark.parametrize("batch_first", [True, False])
def test_traceable_encoder_computes_what_torch_computes(norm_first, batch_first) -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(
        16, 4, 32, dropout=0.0, batch_first=batch_first, norm_first=norm_first
    )
    original = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    traced = copy.deepcopy(original)
    assert make_traceable(traced) == 5  # the encoder, two layers, two attention layers
    x = torch.randn(3, 7, 16) if batch_first else torch.randn(7, 3, 16)
    causal = nn.Transformer.generate_square_subsequent_mask(7)
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[0, 5:] = True
    masks = [{}, {"mask": causal}, {"mask": causal.isinf()}, {"src_key_padding_mask": padding}]
    masks.append({"mask": causal, "src_key_padding_mask": padding})
    with torch.no_grad():
        for kwargs in masks:
            torch.testing.assert_close(traced(x, **kwargs), original(x, **kwargs))
    assert traced.state_dict().keys() == original.state_dict().keys()
    torch.fx.symbolic_trace(traced)  # traceable (the original encoder is not)


def test_traceable_attention_returns_the_same_weights_and_leaves_cross_attention() -> None:
    torch.manual_seed(0)
    original = nn.MultiheadAttention(16, 4, batch_first=True)
    traced = copy.deepcopy(original)
    make_traceable(traced)
    x, memory = torch.randn(2, 5, 16), torch.randn(2, 6, 16)
    for average in (True, False):
        (a, wa), (b, wb) = (m(x, x, x, average_attn_weights=average) for m in (original, traced))
        torch.testing.assert_close(b, a)
        torch.testing.assert_close(wb, wa)
    torch.testing.assert_close(traced(x, memory, memory)[0], original(x, memory, memory)[0])
    for m in (original, traced):  # a causal hint without a mask: torch's own error
        with pytest.raises(RuntimeError, match="is_causal"):
            m(x, x, x, is_causal=True)
    kdim = nn.MultiheadAttention(16, 4, kdim=8, vdim=8)
    assert make_traceable(kdim) == 0  # separate projections: left as they are


@pytest.mark.parametrize("name", ALIGNED)
def test_every_hidden_unit_of_a_transformer_is_in_a_group(name: str) -> None:
    model = make_net(name)
    make_traceable(model)
    found = _discover(name, model)
    assert [u.reasons for u in found.untransformed] == [("it reaches the model's output",)]
    heads = {g.name: g for g in found.spec.groups if g.heads > 1}
    assert len(heads) == 4  # values and scores of two attention layers
    scores = [g for g in heads.values() if g.follows is not None]
    assert all(g.follows in heads for g in scores)
    fused_qkv = name != "separate_qkv"  # the queries: the first units of the fused output
    assert all(g.collect_from == (0 if fused_qkv else None) for g in scores)
    fused = {c.name: c for c in found.spec.concats}
    assert len(fused) == (2 if fused_qkv else 0)
    assert all(len(c.parts) == 3 for c in fused.values())


def test_a_module_named_like_attention_that_computes_something_else_is_not_aligned() -> None:
    found = _discover("not_attention", make_net("not_attention"))
    assert not any(g.heads > 1 for g in found.spec.groups)
    assert {w for u in found.untransformed for w in u.writers} >= {"blocks.0.attn.qkv"}


def _moved_copy(name: str, model: nn.Module, dense_heads: bool) -> dict[str, torch.Tensor]:
    return moved_state(model.state_dict(), _discover(name, model).spec, dense_heads)


@pytest.mark.parametrize("options", [{}, {"refit": False}, {"method_params": {"gamma": 0.0}}])
@pytest.mark.parametrize("name", ALIGNED)
def test_a_transformer_merged_with_its_moved_copy_is_returned(name, options, tmp_path) -> None:
    torch.manual_seed(0)
    model = make_net(name)
    make_traceable(model)
    model.eval()
    dense = "method_params" in options  # an unregularised CCA recovers dense maps exactly
    moved = _moved_copy(name, model, dense_heads=dense)
    paths = [str(tmp_path / "a.pt"), str(tmp_path / "b.pt")]
    torch.save(model.state_dict(), paths[0])
    torch.save(moved, paths[1])
    other = copy.deepcopy(model)
    other.load_state_dict(moved)
    x = inputs(name, 8, 3)
    with torch.no_grad():
        expected = model(x)
        # the test can fail: the copy is the same function in other coordinates
        torch.testing.assert_close(other(x), expected, rtol=1e-4, atol=1e-5)
    key = "input_ids" if name == "token_lm" else "x"  # integer token ids stay integer
    np.savez(tmp_path / "calib.npz", **{key: inputs(name, 128, 0).numpy()})
    calib = str(tmp_path / "calib.npz")
    result = merge(paths, model=FACTORY, model_args={"name": name}, data=calib, **options)
    assert_merged_back(result, x, expected, name)
    if options.get("refit", True):  # every linear layer, fused projections and norms too
        fitted = {layer["name"] for layer in result.report["refit"]["layers"]}
        assert fitted == _refitted_layers(model), fitted


def _refitted_layers(model: nn.Module) -> set[str]:
    names = set()
    for n, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.LayerNorm)):
            names.add(n)
        elif isinstance(m, nn.MultiheadAttention):
            names.add(f"{n}.in_proj_weight")
    return names
