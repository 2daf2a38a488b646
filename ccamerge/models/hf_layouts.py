"""Feature groups of the Hugging Face transformer families whose layout ccamerge knows.

torch.fx cannot trace ``transformers`` models, so their groups are written here from
each family's module names (docs/transformers.md): per block, the attention layer's
value/output space and its query/key space as groups of heads (the second takes the
heads in the order of the first), the MLP's hidden units as for any MLP, and the
residual stream as one group that every embedding, every block's output projections,
every norm and every layer reading the stream share. The stream is aligned by
permutations: they are exact through LayerNorm (its gain and bias permuted with it),
before or after the residual addition, and keep tied input and output embeddings tied;
where every norm on a pre-norm stream can be folded into the layers reading it
(:func:`_norm_folds`), by orthogonal maps keeping the all-ones direction. Under rotary
position embeddings (the Llama family) the query/key group moves whole heads only (under
grouped-query attention, the key/value heads: :func:`_grouped_query_attention`), and a
gated MLP's units move by permutations.

A layout is used only when it covers the model: every tensor with a hidden-size axis
must be in a group (else the model is averaged as it is, and the report says which
tensors were not known). GPT-2's ``Conv1D`` layers store their weights as (in, out) and
its attention's query, key and value as one fused tensor: the model built for ccamerge
presents them as PyTorch's (out, in) and as three tensors (``c_attn.q_weight``, ...)
through state-dict hooks, and loads them back the same way, so the merged folder has the
model's own layout.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from .spec import FeatureGroup, HeadCopies, MergeSpec, NormFold

Members = list[tuple[str, int]]
Part = FeatureGroup | HeadCopies | NormFold  # what a layout lists
Layout = Callable[[Mapping[str, Any], Mapping[str, torch.Tensor]], list[Part]]
OFFSET_NORMS = {"gemma"}  # families whose norms compute (1 + weight) * x: never folded

QKV = ("q", "k", "v")


def _affine(module: str) -> Members:
    """A LayerNorm's gain and bias (units on axis 0)."""
    return [(f"{module}.weight", 0), (f"{module}.bias", 0)]


def _writes(module: str) -> Members:
    return _affine(module)  # a Linear's rows and bias: axis 0 too


def _stream(
    d: int, members: Members, collect_at: str, on: str = "input", folded: bool = False
) -> FeatureGroup:
    """The residual stream: permutations, or with its norms ``folded`` orthogonal maps."""
    return FeatureGroup(
        "stream", d, tuple(members), collect_at, on, collect_axis=-1, permutation=not folded,
        orthogonal=folded,
    )  # fmt: skip


def _norm_folds(
    config: Mapping[str, Any],
    state: Mapping[str, torch.Tensor],
    blocks: list[dict[str, tuple[str, ...]]],
    final: str,
    heads: tuple[str, ...],
) -> list[NormFold]:
    """The folds of a pre-norm stream's norms (docs/transformers.md): per block, each
    norm and the Linear modules reading it (``blocks``), and the ``final`` norm read by
    the ``heads`` the model has (the layers that alone read it). None (the stream then
    takes permutations) when one cannot be made: no head reads the final norm (a base
    model outputs it), a head tied to the embeddings, a norm with a bias read by a layer
    without one, a family whose norms compute ``(1 + weight) x``."""
    readers = tuple(h for h in heads if f"{h}.weight" in state)
    folds = [NormFold(n, r) for block in blocks for n, r in block.items()]
    folds.append(NormFold(final, readers))
    tied = config.get("tie_word_embeddings", False) and "lm_head" in readers
    if not readers or tied or config.get("model_type") in OFFSET_NORMS:
        return []
    for f in folds:
        if f"{f.norm}.bias" in state and any(f"{r}.bias" not in state for r in f.readers):
            return []
    return folds


def _mlp(name: str, fc1: str, fc2: str, size: int) -> FeatureGroup:
    members = (*_writes(fc1), (f"{fc2}.weight", 1))
    return FeatureGroup(name, size, members, fc2, "input", collect_axis=-1)


def _attention(
    name: str,
    qkv: Mapping[str, str],
    out: str,
    d: int,
    heads: int,
    fused: bool = False,
    state: Mapping[str, torch.Tensor] | None = None,
    whole_heads: bool = False,
) -> list[FeatureGroup]:
    """An attention layer's two groups of heads: the value/output space (collected at the
    output projection's input) and the query/key space that follows it (collected at
    the query projection's output: with ``fused``, the first ``d`` units of the fused
    projection's). ``qkv`` maps q, k, v to each projection's weight name (its bias: the
    same with ``bias``; given ``state``, only the biases it holds); ``whole_heads``: the
    query/key units keep their order within each head (rotary position embeddings)."""
    bias = {k: w.removesuffix("weight") + "bias" for k, w in qkv.items()}
    if state is not None:
        bias = {k: b for k, b in bias.items() if b in state}
    values = ((qkv["v"], 0), *([(bias["v"], 0)] if "v" in bias else []), (f"{out}.weight", 1))
    scores = tuple((t, 0) for k in ("q", "k") for t in (qkv[k], bias.get(k)) if t is not None)
    query = qkv["q"].removesuffix(".q_weight" if fused else ".weight")
    return [
        FeatureGroup(f"{name}.values", d, values, out, "input", collect_axis=-1, heads=heads),
        FeatureGroup(
            f"{name}.scores",
            d,
            scores,
            query,
            "output",
            collect_axis=-1,
            heads=heads,
            follows=f"{name}.values",
            collect_from=0 if fused else None,
            whole_heads=whole_heads,
        ),
    ]


def _readers(state: Mapping[str, torch.Tensor], names: tuple[str, ...]) -> Members:
    """Heads reading the final stream (axis 1), those of ``names`` the model has."""
    return [(n, 1) for n in names if n in state]


def _prefix(state: Mapping[str, torch.Tensor], marker: str) -> str:
    """The base model's prefix: what comes before ``marker`` in the first name with it."""
    for name in state:
        if marker in name:
            return name[: name.index(marker)]
    return ""


def _pre_ln_block(
    name: str, layers: Mapping[str, str], qkv: Mapping[str, str], heads: int, state: Any
) -> tuple[Members, list[FeatureGroup]]:
    """A pre-LN block's stream members and its groups; ``layers`` names its modules:
    ``ln1``, ``out`` (attention's output projection), ``ln2``, ``fc1``, ``fc2``."""
    fc1, fc2, out = layers["fc1"], layers["fc2"], layers["out"]
    stream = _affine(layers["ln1"]) + [(w, 1) for w in qkv.values()] + _writes(out)
    stream += _affine(layers["ln2"]) + [(f"{fc1}.weight", 1)] + _writes(fc2)
    d, fused = state[f"{out}.weight"].shape[0], qkv["q"].endswith("q_weight")
    groups = _attention(f"{name}.attn", qkv, out, d, heads, fused)
    groups.append(_mlp(f"{name}.mlp", fc1, fc2, state[f"{fc1}.weight"].shape[0]))
    return stream, groups


Block = Callable[..., tuple[Members, list[FeatureGroup]]]  # _pre_ln_block, _post_ln_block


def _blocks(
    block: Block,
    name: str,
    base: str,
    count: int,
    modules: Mapping[str, str],
    heads: int,
    state: Any,
) -> tuple[Members, list[FeatureGroup]]:
    """The stream's members and the groups of ``count`` blocks: block i's modules are
    ``base.format(i)`` followed by each of ``modules`` (by role: the ``q``, ``k``, ``v``
    weights, then ``ln1``, ``out``, ...: what ``block`` reads), its groups ``{name}{i}.*``."""
    stream: Members = []
    groups: list[FeatureGroup] = []
    for i in range(count):
        layers = {role: base.format(i) + m for role, m in modules.items()}
        qkv = {k: layers.pop(k) for k in QKV}
        members, block_groups = block(f"{name}{i}", layers, qkv, heads, state)
        stream, groups = stream + members, groups + block_groups
    return stream, groups


def gpt2(config: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> list[FeatureGroup]:
    p = _prefix(state, "wte.weight")
    modules = {k: f"attn.c_attn.{k}_weight" for k in QKV}
    modules |= {"ln1": "ln_1", "out": "attn.c_proj", "ln2": "ln_2", "fc1": "mlp.c_fc"}
    modules |= {"fc2": "mlp.c_proj"}
    count, heads = config["n_layer"], config["n_head"]
    members, groups = _blocks(_pre_ln_block, "h", p + "h.{}.", count, modules, heads, state)
    stream = [(f"{p}wte.weight", 1), (f"{p}wpe.weight", 1), *members]
    stream += _affine(f"{p}ln_f") + _readers(state, ("lm_head.weight", "score.weight"))
    return [_stream(config["n_embd"], stream, f"{p}ln_f"), *groups]


VIT_HEADS = ("classifier", "cls_classifier", "distillation_classifier")  # DeiT: two


def vit(config: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> list[Part]:
    """ViT, and DeiT (a distillation token beside the class token, and a head on each)."""
    p = _prefix(state, "embeddings.cls_token")
    e = f"{p}embeddings."
    stream = [(f"{e}cls_token", 2), (f"{e}position_embeddings", 2)]
    stream += [(f"{e}distillation_token", 2)] if f"{e}distillation_token" in state else []
    stream += _writes(f"{e}patch_embeddings.projection")
    modules = {k: f"attention.{k}_proj.weight" for k in QKV}
    modules |= {"ln1": "layernorm_before", "out": "attention.o_proj", "ln2": "layernorm_after"}
    modules |= {"fc1": "mlp.fc1", "fc2": "mlp.fc2"}
    count, heads = config["num_hidden_layers"], config["num_attention_heads"]
    base = p + "layers.{}."
    members, groups = _blocks(_pre_ln_block, "layer", base, count, modules, heads, state)
    stream += members + _affine(f"{p}layernorm")
    stream += _readers(state, tuple(f"{h}.weight" for h in VIT_HEADS))
    if f"{p}pooler.dense.weight" in state:  # act(dense(first token)): units of its own
        stream += [(f"{p}pooler.dense.weight", 1)]
        pooled = tuple(_writes(f"{p}pooler.dense"))
        groups.append(
            FeatureGroup("pooler", config["hidden_size"], pooled, f"{p}pooler", collect_axis=-1)
        )
    attention = tuple(f"attention.{k}_proj" for k in QKV)
    blocks = [
        {f"{b}layernorm_before": tuple(b + r for r in attention),
         f"{b}layernorm_after": (f"{b}mlp.fc1",)}
        for b in (base.format(i) for i in range(count))
    ]  # fmt: skip
    # the classifiers alone read the final norm; a ViTModel outputs it (and its pooler)
    folds = _norm_folds(config, state, blocks, f"{p}layernorm", VIT_HEADS)
    return [
        _stream(config["hidden_size"], stream, f"{p}layernorm", folded=bool(folds)),
        *groups,
        *folds,
    ]


def opt(config: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> list[FeatureGroup]:
    """OPT: learned positions, pre-LN blocks (post-LN with ``do_layer_norm_before``
    false), a tied head; with ``word_embed_proj_dim`` below the width, the token
    embeddings and the head have units of their own, which ``project_in`` maps into the
    stream and ``project_out`` out of it."""
    p = _prefix(state, "decoder.embed_tokens.weight") + "decoder."
    pre_ln = config.get("do_layer_norm_before", True)
    modules = {k: f"self_attn.{k}_proj.weight" for k in QKV}
    modules |= {"out": "self_attn.out_proj", "ln1": "self_attn_layer_norm"}
    modules |= {"ln2": "final_layer_norm", "fc1": "fc1", "fc2": "fc2"}
    count, heads = config["num_hidden_layers"], config["num_attention_heads"]
    block = _pre_ln_block if pre_ln else _post_ln_block
    members, groups = _blocks(block, "layer", p + "layers.{}.", count, modules, heads, state)
    stream = [(f"{p}embed_positions.weight", 1), *members]
    if f"{p}project_in.weight" in state:
        stream += [(f"{p}project_in.weight", 0), (f"{p}project_out.weight", 1)]
    else:
        stream += [(f"{p}embed_tokens.weight", 1)] + _readers(state, ("lm_head.weight",))
        stream += _readers(state, ("score.weight",))
    if pre_ln:
        stream += _affine(f"{p}final_layer_norm")
        collect = f"{p}final_layer_norm"
    else:
        collect = f"{p}layers.{count - 1}.final_layer_norm"
    return [
        _stream(config["hidden_size"], stream, collect, "input" if pre_ln else "output"),
        *groups,
    ]


def _post_ln_block(
    name: str, layers: Mapping[str, str], qkv: Mapping[str, str], heads: int, state: Any
) -> tuple[Members, list[FeatureGroup]]:
    """A post-LN block's stream members and its groups; ``layers`` names its modules:
    ``out`` (attention's output projection), ``ln1`` (after the attention's residual
    sum), ``fc1``, ``fc2``, ``ln2`` (after the MLP's)."""
    fc1, fc2, out = layers["fc1"], layers["fc2"], layers["out"]
    stream = [(w, 1) for w in qkv.values()] + _writes(out) + _affine(layers["ln1"])
    stream += [(f"{fc1}.weight", 1)] + _writes(fc2) + _affine(layers["ln2"])
    d = state[f"{out}.weight"].shape[0]
    groups = _attention(f"{name}.attn", qkv, out, d, heads)
    groups.append(_mlp(f"{name}.mlp", fc1, fc2, state[f"{fc1}.weight"].shape[0]))
    return stream, groups


def _head(name: str, dense: str, reader: str, state: Any) -> tuple[Members, FeatureGroup]:
    """A classification head's hidden layer: ``dense`` reads the stream (at the first
    token) and writes its own units, which ``reader`` (a Linear) reads; collected at the
    reader's input. Returns the stream's members and the head's group."""
    members = (*_writes(dense), (f"{reader}.weight", 1))
    size = state[f"{dense}.weight"].shape[0]
    return [(f"{dense}.weight", 1)], FeatureGroup(
        name, size, members, reader, collect_axis=-1, collect_on="input"
    )


def _stream_transform(dense: str, norm: str, decoder: str, state: Any) -> Members:
    """A masked-LM head's transform (``dense``, an activation, the LayerNorm ``norm``) maps
    the stream to the space the (tied) ``decoder`` reads, the word embeddings' units: it
    moves with the stream on both sides."""
    if f"{dense}.weight" not in state:
        return []
    members = [(f"{dense}.weight", 0), (f"{dense}.weight", 1), (f"{dense}.bias", 0)]
    return members + _affine(norm) + _readers(state, (f"{decoder}.weight",))


def _bert_encoder(
    config: Mapping[str, Any], state: Mapping[str, torch.Tensor]
) -> tuple[str, Members, list[FeatureGroup]]:
    """BERT's and RoBERTa's embeddings and post-LN blocks: the base model's prefix, the
    stream's members and the blocks' groups."""
    p = _prefix(state, "embeddings.word_embeddings.weight")
    e = f"{p}embeddings."
    stream = [(f"{e}{k}_embeddings.weight", 1) for k in ("word", "position", "token_type")]
    stream += _affine(f"{e}LayerNorm")
    names = {"q": "query", "k": "key", "v": "value"}
    modules = {k: f"attention.self.{n}.weight" for k, n in names.items()}
    modules |= {"out": "attention.output.dense", "ln1": "attention.output.LayerNorm"}
    modules |= {"fc1": "intermediate.dense", "fc2": "output.dense", "ln2": "output.LayerNorm"}
    count, heads = config["num_hidden_layers"], config["num_attention_heads"]
    members, groups = _blocks(
        _post_ln_block, "layer", p + "encoder.layer.{}.", count, modules, heads, state
    )
    return p, stream + members, groups


def bert(config: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> list[FeatureGroup]:
    """Post-LN: the stream is each block's last LayerNorm's output."""
    p, stream, groups = _bert_encoder(config, state)
    d = config["hidden_size"]
    if f"{p}pooler.dense.weight" in state:  # tanh(dense(first token)): its own units
        stream += [(f"{p}pooler.dense.weight", 1)]
        pooled = (*_writes(f"{p}pooler.dense"), *_readers(state, ("classifier.weight",)))
        groups.append(FeatureGroup("pooler", d, pooled, f"{p}pooler", collect_axis=-1))
    t = "cls.predictions."
    stream += _stream_transform(
        f"{t}transform.dense", f"{t}transform.LayerNorm", f"{t}decoder", state
    )
    collect = f"{p}encoder.layer.{config['num_hidden_layers'] - 1}.output.LayerNorm"
    return [_stream(d, stream, collect, "output"), *groups]


def roberta(config: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> list[FeatureGroup]:
    """BERT's encoder; heads: a classifier's hidden layer (``classifier.dense``, tanh,
    ``classifier.out_proj``) or the masked-LM head (``lm_head``)."""
    p, stream, groups = _bert_encoder(config, state)
    if "classifier.dense.weight" in state:
        members, head = _head("head", "classifier.dense", "classifier.out_proj", state)
        stream, groups = stream + members, groups + [head]
    stream += _stream_transform("lm_head.dense", "lm_head.layer_norm", "lm_head.decoder", state)
    collect = f"{p}encoder.layer.{config['num_hidden_layers'] - 1}.output.LayerNorm"
    return [_stream(config["hidden_size"], stream, collect, "output"), *groups]


def distilbert(config: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> list[FeatureGroup]:
    """Post-LN blocks (``sa_layer_norm``, ``output_layer_norm``); heads: a classifier's
    hidden layer (``pre_classifier``, ReLU, ``classifier``) or the masked-LM head
    (``vocab_transform``, ``vocab_layer_norm``, ``vocab_projector``)."""
    p = _prefix(state, "embeddings.word_embeddings.weight")
    e = f"{p}embeddings."
    stream = [(f"{e}word_embeddings.weight", 1), (f"{e}position_embeddings.weight", 1)]
    stream += _affine(f"{e}LayerNorm")
    modules = {k: f"attention.{k}_lin.weight" for k in QKV}
    modules |= {"out": "attention.out_lin", "ln1": "sa_layer_norm", "fc1": "ffn.lin1"}
    modules |= {"fc2": "ffn.lin2", "ln2": "output_layer_norm"}
    base, count = p + "transformer.layer.{}.", config["n_layers"]
    members, groups = _blocks(
        _post_ln_block, "layer", base, count, modules, config["n_heads"], state
    )
    stream += members
    if "pre_classifier.weight" in state:
        members, head = _head("head", "pre_classifier", "classifier", state)
        stream, groups = stream + members, groups + [head]
    stream += _stream_transform("vocab_transform", "vocab_layer_norm", "vocab_projector", state)
    collect = f"{p}transformer.layer.{config['n_layers'] - 1}.output_layer_norm"
    return [_stream(config["dim"], stream, collect, "output"), *groups]


def _rows(module: str, state: Mapping[str, torch.Tensor]) -> Members:
    """A Linear's rows: its weight and, when it has one, its bias (axis 0)."""
    return [(f"{module}.{t}", 0) for t in ("weight", "bias") if f"{module}.{t}" in state]


def _grouped_query_attention(
    name: str, qkv: Mapping[str, str], out: str, heads: int, state: Any
) -> list[Part]:
    """Rotary attention with fewer key/value heads than query heads: the value heads'
    units (collected at the value projection's output) and the key heads' (at the key
    projection's; whole heads, in the value heads' order) are the groups; each key/value
    head's query heads read its keys and write into the output projection through its
    values, so the query rows and the output projection's columns are copies of those
    groups (:class:`HeadCopies`). The query heads sharing a key/value head keep their
    order; with one key/value head (multi-query attention) the queries and keys stay as
    they are."""
    kv_heads = heads * state[qkv["k"]].shape[0] // state[qkv["q"]].shape[0]
    if kv_heads < 1 or heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of the key/value heads")
    size, copies = state[qkv["k"]].shape[0], heads // kv_heads
    project = {k: qkv[k].removesuffix(".weight") for k in QKV}
    values, scores = f"{name}.values", f"{name}.scores"
    groups: list[Part] = [
        FeatureGroup(values, size, tuple(_rows(project["v"], state)), project["v"],
                     collect_axis=-1, heads=kv_heads),
        HeadCopies(f"{name}.outputs", values, copies, ((f"{out}.weight", 1),)),
    ]  # fmt: skip
    if kv_heads > 1:  # one key head has nothing to move: its rotary units keep their order
        groups += [
            FeatureGroup(scores, size, tuple(_rows(project["k"], state)), project["k"],
                         collect_axis=-1, heads=kv_heads, follows=values, whole_heads=True),
            HeadCopies(f"{name}.queries", scores, copies, tuple(_rows(project["q"], state))),
        ]  # fmt: skip
    return groups


def llama(config: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> list[Part]:
    """Llama and the families written like it (Mistral, Qwen2): pre-norm blocks with
    RMSNorm (a gain, permuted with the stream), rotary position embeddings on queries
    and keys (their units keep their order within heads: whole heads move), a gated MLP
    whose gate and up projections share their units (``act(gate) * up``: permutations
    only). Under grouped-query attention (fewer key/value heads than query heads) the
    key/value heads are the units (:func:`_grouped_query_attention`). Qwen3's query and
    key norms (one gain over each head's units, shared by the heads) stay as they are:
    whole heads move, and the units within them keep their order."""
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    p = _prefix(state, "embed_tokens.weight")
    d = config["hidden_size"]
    stream: Members = [(f"{p}embed_tokens.weight", 1)]
    groups: list[Part] = []
    for i in range(config["num_hidden_layers"]):
        b = f"{p}layers.{i}."
        qkv = {k: f"{b}self_attn.{k}_proj.weight" for k in QKV}
        out, mlp = f"{b}self_attn.o_proj", f"{b}mlp."
        stream += [(f"{b}input_layernorm.weight", 0), *((w, 1) for w in qkv.values())]
        stream += _rows(out, state) + [(f"{b}post_attention_layernorm.weight", 0)]
        stream += [(f"{mlp}gate_proj.weight", 1), (f"{mlp}up_proj.weight", 1)]
        stream += _rows(f"{mlp}down_proj", state)
        if kv_heads == heads:
            size = state[f"{out}.weight"].shape[1]
            groups += _attention(
                f"layer{i}.attn", qkv, out, size, heads, state=state, whole_heads=True
            )
        else:
            groups += _grouped_query_attention(f"layer{i}.attn", qkv, out, heads, state)
        hidden = _rows(f"{mlp}gate_proj", state) + _rows(f"{mlp}up_proj", state)
        members = (*hidden, (f"{mlp}down_proj.weight", 1))
        size = state[f"{mlp}gate_proj.weight"].shape[0]
        groups.append(
            FeatureGroup(
                f"layer{i}.mlp",
                size,
                members,
                f"{mlp}down_proj",
                "input",
                collect_axis=-1,
                permutation=True,
            )  # fmt: skip
        )
    stream += [(f"{p}norm.weight", 0)] + _readers(state, ("lm_head.weight", "score.weight"))
    blocks = [
        {f"{b}input_layernorm": tuple(f"{b}self_attn.{k}_proj" for k in QKV),
         f"{b}post_attention_layernorm": (f"{b}mlp.gate_proj", f"{b}mlp.up_proj")}
        for b in (f"{p}layers.{i}." for i in range(config["num_hidden_layers"]))
    ]  # fmt: skip
    folds = _norm_folds(config, state, blocks, f"{p}norm", ("lm_head", "score"))
    return [_stream(d, stream, f"{p}norm", folded=bool(folds)), *groups, *folds]


LAYOUTS: dict[str, Layout] = {
    "gpt2": gpt2,
    "vit": vit,
    "deit": vit,
    "bert": bert,
    "roberta": roberta,
    "xlm-roberta": roberta,
    "camembert": roberta,
    "distilbert": distilbert,
    "llama": llama,
    "mistral": llama,
    "qwen2": llama,
    "gemma": llama,
    "qwen3": llama,
    "opt": opt,
}
FUSED_QKV = {"gpt2": ".attn.c_attn"}  # model_type -> the fused projection's name suffix


def layout_spec(
    model_type: str, config: Mapping[str, Any], state: Mapping[str, torch.Tensor]
) -> tuple[MergeSpec | None, str | None]:
    """The spec of a known family's model (``state``: its state dict as ccamerge sees
    it), or None and why not: an unknown family, or a layout that does not cover the
    model (a tensor it does not name, or one with a hidden-size axis left in no group)."""
    layout = LAYOUTS.get(model_type)
    if layout is None:
        return None, None
    try:
        parts = layout(config, state)
        groups, copies, folds = (
            tuple(p for p in parts if isinstance(p, kind))
            for kind in (FeatureGroup, HeadCopies, NormFold)
        )
        spec = MergeSpec(groups, copies=copies, folds=folds)
        spec.validate(state)
    except (KeyError, ValueError) as e:  # a name or shape this layout does not know
        return None, f"the {model_type} layout does not fit this model ({e})"
    d = spec.group("stream").size
    left = [n for n, t in state.items() if n not in spec.axes and d in t.shape]
    if left:
        return None, f"the {model_type} layout leaves {', '.join(left[:3])} in no group"
    return spec, None


# ---------------------------------------------------------------------------
# the layout ccamerge sees: (out, in) weights, fused projections split


def is_conv1d(m: nn.Module) -> bool:
    """transformers' ``Conv1D``: a linear layer whose weight is stored as (in, out)."""
    return type(m).__name__ == "Conv1D" and isinstance(getattr(m, "weight", None), torch.Tensor)


def canonical_layout(model: nn.Module, model_type: str) -> None:
    """State-dict hooks on ``model``: transformers' ``Conv1D`` weights appear transposed
    to (out, in) and, for the families in :data:`FUSED_QKV`, the fused query/key/value
    projection as three (``{name}.q_weight``, ``q_bias``, ...); loading takes that layout
    back. :func:`native_layout` removes the hooks (``save_pretrained`` writes the
    model's own layout)."""
    conv1d = [n for n, m in model.named_modules() if is_conv1d(m)]
    suffix = FUSED_QKV.get(model_type)
    fused = [n for n in conv1d if suffix and n.endswith(suffix)]
    if not conv1d:
        return

    def present(module, state_dict, prefix, local_metadata):
        for name in conv1d:
            key = f"{prefix}{name}.weight"
            state_dict[key] = state_dict[key].t()
        for name in fused:
            for part in ("weight", "bias"):
                whole = state_dict.pop(f"{prefix}{name}.{part}")
                for k, t in zip(QKV, whole.chunk(3)):
                    state_dict[f"{prefix}{name}.{k}_{part}"] = t

    def take(module, state_dict, prefix, *args):
        for name in fused:
            for part in ("weight", "bias"):
                keys = [f"{prefix}{name}.{k}_{part}" for k in QKV]
                if all(k in state_dict for k in keys):
                    parts = [state_dict.pop(k) for k in keys]
                    state_dict[f"{prefix}{name}.{part}"] = torch.cat(parts)
        for name in conv1d:
            key = f"{prefix}{name}.weight"
            if key in state_dict:
                state_dict[key] = state_dict[key].t().contiguous()

    hooks = (
        model._register_state_dict_hook(present),
        model.register_load_state_dict_pre_hook(take),
    )
    model._ccamerge_layout_hooks = hooks


def native_layout(model: nn.Module) -> nn.Module:
    """``model`` without :func:`canonical_layout`'s hooks: its state dict is its own."""
    for hook in getattr(model, "_ccamerge_layout_hooks", ()):
        hook.remove()
    return model
