"""Self-attention layers that discovery aligns head by head (docs/transformers.md).

Discovery treats a self-attention layer as one step: it reads its input's units through
the fused query/key/value projection's columns and writes new units through the output
projection's rows (tied to the residual stream by the addition that follows), and inside
it are the two groups of heads every transformer layout has: the values (the value rows
of the fused projection and the output projection's columns) and the scores (the query and
key rows), which follow the values' head order. The fused projection's rows are a
concatenation of scores, scores and values (its map: block-diagonal).

Two kinds of layers are recognised:

* ``nn.MultiheadAttention`` with one packed input projection (``kdim == vdim ==
  embed_dim``, no ``bias_k``/``bias_v``, no ``add_zero_attn``), called on one tensor as
  query, key and value. Its own forward hides the projections in one functional call, so
  ccamerge gives the instances of the models it builds a forward of its own
  (:class:`TracedMultiheadAttention`: the same function, written as traceable steps, the
  output projection called as a module, the fused projection's output seen by an
  identity module ``qkv_tap``); ``nn.TransformerEncoderLayer`` and
  ``nn.TransformerEncoder`` get one too (their fused fast path skipped). Parameter names,
  and so checkpoints, stay as they are.
* A module with a fused ``qkv`` ``Linear`` (3 x dim outputs) or three ``Linear``
  projections (``q_proj``/``k_proj``/``v_proj``, ``query``/``key``/``value`` or
  ``q``/``k``/``v``), an output ``Linear`` (``proj``, ``out_proj``, ``o_proj`` or ``out``)
  and a number of heads (``num_heads``, ``n_heads`` or ``heads``): timm's ``Attention``
  and code written like it, called on one tensor ``(batch, tokens, dim)``. The names only
  propose it: the module's output is checked against plain multi-head attention of those
  weights (with and without a causal mask) on random tokens before it is treated as one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn


@dataclass(frozen=True)
class AttentionLayout:
    """A recognised self-attention module's tensors, relative to the module: the
    ``weights`` and ``biases`` (None: no bias) of its input projections, one fused
    projection (rows: queries, keys, values) or three (query, key, value), the output
    projection module ``out``, ``heads``, and where the groups are read: the queries are
    the first ``dim`` units of the output of module ``queries_at``, the heads'
    concatenated values the input of ``out``."""

    weights: tuple[str, ...]
    biases: tuple[str | None, ...]
    out: str
    heads: int
    queries_at: str
    dim: int

    @property
    def fused(self) -> bool:
        return len(self.weights) == 1


# ---------------------------------------------------------------------------
# torch.nn's attention layers, written as traceable steps


@fx.wrap
def attention_bias(
    attn_mask: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    shape: tuple[int, int, int, int],
    dtype: torch.dtype,
) -> torch.Tensor | None:
    """The additive mask ``(batch, heads, queries, keys)`` of ``nn.MultiheadAttention``'s
    two masks (boolean: True is masked out; float: added)."""
    batch, heads, queries, keys = shape
    device = next(m for m in (attn_mask, key_padding_mask) if m is not None).device
    out = torch.zeros(shape, dtype=dtype, device=device)
    for mask, view in (
        (attn_mask, (-1, heads, queries, keys)),
        (key_padding_mask, (batch, 1, 1, keys)),
    ):
        if mask is None:
            continue
        if mask.dim() == 2 and mask is attn_mask:  # one (queries, keys) mask for all
            view = (1, 1, queries, keys)
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
                mask, float("-inf")
            )
        out = out + mask.to(dtype).reshape(view)
    return out


class TracedMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention``'s self-attention as traceable steps (see the module
    docstring); anything else (cross-attention, unbatched inputs) runs the original."""

    qkv_tap: nn.Module

    def forward(  # type: ignore[override]
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        tracing = fx._symbolic_trace.is_fx_symbolic_tracing()
        unusual = is_causal is True and attn_mask is None  # torch's own forward says what is wrong
        if unusual or not (query is key is value) or (not tracing and query.dim() != 3):
            return super().forward(
                query, key, value, key_padding_mask, need_weights, attn_mask,
                average_attn_weights, is_causal,
            )  # fmt: skip
        x = query if self.batch_first else query.transpose(0, 1)
        batch, length = x.shape[0], x.shape[1]
        heads, width = self.num_heads, self.head_dim
        qkv = self.qkv_tap(F.linear(x, self.in_proj_weight, self.in_proj_bias))
        q, k, v = qkv.chunk(3, dim=-1)
        q, k, v = (t.reshape(batch, length, heads, width).transpose(1, 2) for t in (q, k, v))
        bias = None
        if attn_mask is not None or key_padding_mask is not None:
            shape = (batch, heads, length, length)
            bias = attention_bias(attn_mask, key_padding_mask, shape, x.dtype)
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = q @ k.transpose(-2, -1) / math.sqrt(width)
            weights = torch.softmax(scores if bias is None else scores + bias, dim=-1)
            weights = F.dropout(weights, p) if p else weights
            heads_out = weights @ v
            weights = weights.mean(dim=1) if average_attn_weights else weights
        else:
            heads_out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)
        out = self.out_proj(heads_out.transpose(1, 2).reshape(batch, length, self.embed_dim))
        return (out if self.batch_first else out.transpose(0, 1)), weights


class TracedTransformerEncoderLayer(nn.TransformerEncoderLayer):
    """``nn.TransformerEncoderLayer`` without its fused fast path (the same function)."""

    def forward(  # type: ignore[override]
        self,
        src: torch.Tensor,
        src_mask: torch.Tensor | None = None,
        src_key_padding_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            return x + self._ff_block(self.norm2(x))
        x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal))
        return self.norm2(x + self._ff_block(x))


class TracedTransformerEncoder(nn.TransformerEncoder):
    """``nn.TransformerEncoder`` without its nested-tensor fast path."""

    def forward(  # type: ignore[override]
        self,
        src: torch.Tensor,
        mask: torch.Tensor | None = None,
        src_key_padding_mask: torch.Tensor | None = None,
        is_causal: bool | None = None,
    ) -> torch.Tensor:
        out = src
        for layer in self.layers:
            out = layer(
                out, src_mask=mask, src_key_padding_mask=src_key_padding_mask,
                is_causal=is_causal is True,
            )  # fmt: skip
        return self.norm(out) if self.norm is not None else out


def _packed(m: nn.MultiheadAttention) -> bool:
    return m._qkv_same_embed_dim and m.bias_k is None and not m.add_zero_attn


def make_traceable(model: nn.Module) -> int:
    """Give ``model``'s torch.nn attention layers the traceable forwards above (in place:
    the same parameters, the same function); returns how many modules changed."""
    swaps = (
        (nn.TransformerEncoder, TracedTransformerEncoder),
        (nn.TransformerEncoderLayer, TracedTransformerEncoderLayer),
        (nn.MultiheadAttention, TracedMultiheadAttention),
    )
    changed = 0
    for m in model.modules():
        for original, traced in swaps:
            if type(m) is original and (original is not nn.MultiheadAttention or _packed(m)):
                m.__class__ = traced
                if traced is TracedMultiheadAttention:
                    m.qkv_tap = nn.Identity()
                changed += 1
    return changed


# ---------------------------------------------------------------------------
# recognition


def attention_layout(m: nn.Module) -> AttentionLayout | None:
    """The layout of a self-attention module discovery can align, else None."""
    if isinstance(m, TracedMultiheadAttention):
        bias = "in_proj_bias" if m.in_proj_bias is not None else None
        return AttentionLayout(
            ("in_proj_weight",), (bias,), "out_proj", m.num_heads, "qkv_tap", m.embed_dim
        )
    layout = _candidate(m)
    return layout if layout is not None and computes_attention(m, layout) else None


# the names code written like timm's or like Hugging Face's gives its projections
PROJECTION_NAMES = (
    ("qkv",),
    ("q_proj", "k_proj", "v_proj"),
    ("query", "key", "value"),
    ("q", "k", "v"),
)
OUT_NAMES = ("proj", "out_proj", "o_proj", "out")
HEADS_NAMES = ("num_heads", "n_heads", "heads")


def _linears(m: nn.Module, names: tuple[str, ...]) -> list[nn.Linear] | None:
    """``m``'s children ``names``, when every one is a ``Linear``."""
    children = [getattr(m, n, None) for n in names]
    return children if all(isinstance(c, nn.Linear) for c in children) else None  # type: ignore[return-value]


def _candidate(m: nn.Module) -> AttentionLayout | None:
    """A layout by the names of ``m``'s projections, to be checked by what it computes."""
    heads = next((getattr(m, n) for n in HEADS_NAMES if hasattr(m, n)), None)
    out = next((n for n in OUT_NAMES if _linears(m, (n,))), None)
    if out is None or type(heads) is not int or heads < 1:
        return None
    dim = getattr(m, out).in_features
    for group in PROJECTION_NAMES:
        layers = _linears(m, group)
        if layers is None or out in group:
            continue
        rows = 3 * dim if len(group) == 1 else dim
        if dim % heads or any((l.in_features, l.out_features) != (dim, rows) for l in layers):
            return None
        biases = tuple(f"{n}.bias" if l.bias is not None else None for n, l in zip(group, layers))
        weights = tuple(f"{n}.weight" for n in group)
        return AttentionLayout(weights, biases, out, heads, group[0], dim)
    return None


def reference_attention(
    m: nn.Module, layout: AttentionLayout, x: torch.Tensor, causal: bool
) -> torch.Tensor:
    """Plain multi-head self-attention of ``m``'s weights on ``x`` ``(batch, tokens, dim)``."""
    batch, length, dim = x.shape
    outs = [
        F.linear(x, m.get_parameter(w), m.get_parameter(b) if b else None)
        for w, b in zip(layout.weights, layout.biases)
    ]
    qkv = outs[0].chunk(3, -1) if layout.fused else outs
    q, k, v = (t.reshape(batch, length, layout.heads, -1).transpose(1, 2) for t in qkv)
    heads_out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return m.get_submodule(layout.out)(heads_out.transpose(1, 2).reshape(batch, length, dim))


def computes_attention(m: nn.Module, layout: AttentionLayout) -> bool:
    """Whether ``m(x)`` is plain (or causal) multi-head self-attention of its weights."""
    p = next(m.parameters())
    x = torch.randn(2, 5, layout.dim, generator=torch.Generator().manual_seed(0)).to(p)
    was_training = m.training
    m.eval()
    try:
        with torch.no_grad():
            out = m(x)
            if not isinstance(out, torch.Tensor) or out.shape != x.shape:
                return False
            scale = out.abs().max().clamp_min(1e-6)
            return any(
                torch.allclose(out / scale, reference_attention(m, layout, x, c) / scale, atol=1e-4)
                for c in (False, True)
            )
    except Exception:  # a module that cannot run on one tensor is not one we know
        return False
    finally:
        m.train(was_training)
