"""Transformer alignment of Hugging Face folders (GPT-2, ViT, BERT): a model merged with
a copy of itself whose attention heads, units within heads, residual stream and MLP units
were moved (and, with ``--param gamma=0``, whose heads' value spaces were mixed by dense
invertible maps and their query/key spaces by orthogonal ones) is returned as the
original function, with and without the refit step."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from moved import moved_state
from typer.testing import CliRunner

from ccamerge.cli.app import app
from ccamerge.maths.algebra import fold_norms
from ccamerge.models import hf
from ccamerge.models.hf_layouts import layout_spec, native_layout

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

VOCAB = 40


def _gpt2():
    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=16, n_head=4, vocab_size=VOCAB, n_positions=16, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg)


def _vit():
    cfg = transformers.ViTConfig(
        num_hidden_layers=2, hidden_size=16, num_attention_heads=4, intermediate_size=32,
        image_size=8, patch_size=4, num_channels=1, num_labels=5,
    )  # fmt: skip
    return transformers.ViTForImageClassification(cfg)


def _deit(cls):
    cfg = transformers.DeiTConfig(
        num_hidden_layers=2, hidden_size=16, num_attention_heads=4, intermediate_size=32,
        image_size=8, patch_size=4, num_channels=1, num_labels=5,
    )  # fmt: skip
    return cls(cfg)


def _bert(cls, config_class=None):
    """A BERT-layout model (``config_class``: BertConfig, or RoBERTa's)."""
    cfg = (config_class or transformers.BertConfig)(
        num_hidden_layers=2, hidden_size=16, num_attention_heads=4, intermediate_size=32,
        vocab_size=VOCAB, max_position_embeddings=16, num_labels=3,
    )  # fmt: skip
    return cls(cfg)


def _roberta(cls):
    return _bert(cls, transformers.RobertaConfig)


def _distilbert(cls):
    cfg = transformers.DistilBertConfig(
        n_layers=2, dim=16, n_heads=4, hidden_dim=32, vocab_size=VOCAB,
        max_position_embeddings=16, num_labels=3,
    )  # fmt: skip
    return cls(cfg)


def _llama(config_class, model_class, kv_heads: int = 4, **options):
    cfg = config_class(
        num_hidden_layers=2, hidden_size=16, num_attention_heads=4, num_key_value_heads=kv_heads,
        head_dim=4, intermediate_size=32, vocab_size=VOCAB, max_position_embeddings=16,
        **options,
    )  # fmt: skip
    return model_class(cfg)


def _opt(**options):
    options = {"word_embed_proj_dim": 16, **options}
    cfg = transformers.OPTConfig(
        num_hidden_layers=2, hidden_size=16, num_attention_heads=4, ffn_dim=32,
        vocab_size=VOCAB, max_position_embeddings=16, **options,
    )  # fmt: skip
    return transformers.OPTForCausalLM(cfg)


FAMILIES = {
    "gpt2": (_gpt2, "tokens"),
    "vit": (_vit, "images"),
    "deit": (lambda: _deit(transformers.DeiTForImageClassification), "images"),
    "deit-teacher": (lambda: _deit(transformers.DeiTForImageClassificationWithTeacher), "images"),
    "bert-mlm": (lambda: _bert(transformers.BertForMaskedLM), "tokens"),
    "bert-cls": (lambda: _bert(transformers.BertForSequenceClassification), "tokens"),
    "roberta-mlm": (lambda: _roberta(transformers.RobertaForMaskedLM), "tokens"),
    "roberta-cls": (lambda: _roberta(transformers.RobertaForSequenceClassification), "tokens"),
    "distilbert-mlm": (lambda: _distilbert(transformers.DistilBertForMaskedLM), "tokens"),
    "llama": (lambda: _llama(transformers.LlamaConfig, transformers.LlamaForCausalLM), "tokens"),
    "qwen2": (lambda: _llama(transformers.Qwen2Config, transformers.Qwen2ForCausalLM), "tokens"),
    "llama-tied": (  # a tied head cannot take the final norm: the stream is permuted
        lambda: _llama(
            transformers.LlamaConfig, transformers.LlamaForCausalLM, tie_word_embeddings=True
        ),
        "tokens",
    ),
    "llama-gqa": (
        lambda: _llama(transformers.LlamaConfig, transformers.LlamaForCausalLM, kv_heads=2),
        "tokens",
    ),
    "mistral-mqa": (
        lambda: _llama(transformers.MistralConfig, transformers.MistralForCausalLM, kv_heads=1),
        "tokens",
    ),
    "gemma": (
        lambda: _llama(transformers.GemmaConfig, transformers.GemmaForCausalLM, kv_heads=2),
        "tokens",
    ),
    "qwen3": (
        lambda: _llama(transformers.Qwen3Config, transformers.Qwen3ForCausalLM, kv_heads=2),
        "tokens",
    ),
    "opt": (_opt, "tokens"),
    "opt-post-ln": (lambda: _opt(do_layer_norm_before=False), "tokens"),
    "opt-projected": (lambda: _opt(word_embed_proj_dim=8), "tokens"),
    "distilbert-cls": (
        lambda: _distilbert(transformers.DistilBertForSequenceClassification),
        "tokens",
    ),
}


def _inputs(kind: str, rng) -> np.ndarray:
    if kind == "tokens":
        return rng.integers(0, VOCAB, (160, 10))
    return rng.standard_normal((160, 1, 8, 8)).astype(np.float32)


def _random_norms(model):
    """Every norm's gain and bias made random (freshly built models have 1 and 0, which
    any fold or permutation keeps)."""
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() or ".ln" in name:
                size = p.shape
                p.copy_(
                    0.5 + torch.rand(size, generator=gen)
                    if name.endswith("weight")
                    else torch.rand(size, generator=gen) - 0.5
                )
    return model


def _moved_copy(model, dense_heads: bool):
    """``model``'s tensors (as ccamerge sees them) with every group's units permuted and,
    with ``dense_heads``, each head's value space mixed by a random invertible map."""
    state = model.state_dict()
    spec, why = layout_spec(model.config.model_type, model.config.to_dict(), state)
    assert spec is not None, why
    return spec, moved_state(state, spec, dense_heads)


def _save(model, folder, state=None):
    if state is not None:
        model.load_state_dict(state)
    native_layout(model).save_pretrained(folder)
    return str(folder)


def _npz(path, **arrays) -> str:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    path.write_bytes(buffer.getvalue())
    return str(path)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("options", [(), ("--no-refit",), ("--param", "gamma=0")])
def test_a_transformer_merged_with_its_moved_copy_is_returned(tmp_path, family, options):
    build, kind = FAMILIES[family]
    torch.manual_seed(0)
    original = _random_norms(hf._prepared(build()))
    dense = "gamma=0" in options  # an unregularised CCA recovers dense maps exactly
    spec, moved = _moved_copy(original, dense_heads=dense)
    a = _save(original, tmp_path / "a")
    b = _save(hf._prepared(build()), tmp_path / "b", moved)
    x = _inputs(kind, np.random.default_rng(0))
    data = _npz(tmp_path / "calib.npz", **({"input_ids": x} if kind == "tokens" else {"x": x}))
    out = tmp_path / "out"
    res = CliRunner().invoke(
        app, ["merge", a, b, "--data", data, *options, "-o", f"{out}/", "--json", "-q"]
    )
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["method"] == "cca"
    assert report["aligned"]["fraction"] > 0.9
    loaded = type(original).from_pretrained(str(out)).eval()
    reference = type(original).from_pretrained(a).eval()
    inputs = torch.as_tensor(x[:20])
    with torch.no_grad():
        expected, got = reference(inputs).logits, loaded(inputs).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    other = type(original).from_pretrained(b).eval()
    with torch.no_grad():  # the copy is the same function in other coordinates
        torch.testing.assert_close(other(inputs).logits, expected, rtol=1e-4, atol=1e-5)
    if not dense:  # permutations only: the merge is the original, tensor by tensor (with
        moved_back = loaded.state_dict()  # its norms folded into their readers, if it folds)
        for name, t in fold_norms(reference.state_dict(), spec).items():
            # CCA's maps: permutations up to the round-off of float32 features
            torch.testing.assert_close(moved_back[name], t, rtol=1e-4, atol=1e-5)


def test_a_layout_survives_a_spec_file_and_inspect_shows_its_heads(tmp_path) -> None:
    """``inspect --spec-out`` writes the groups of heads; reading the file back gives the
    same spec; ``inspect`` names the maps each group takes."""
    from ccamerge.models.custom import spec_from_dict, spec_to_dict

    model = hf._prepared(_gpt2())
    spec, _ = layout_spec("gpt2", model.config.to_dict(), model.state_dict())
    assert spec_from_dict(json.loads(json.dumps(spec_to_dict(spec)))) == spec
    folder = _save(model, tmp_path / "g")
    res = CliRunner().invoke(app, ["inspect", folder, "--json"])
    assert res.exit_code == 0, res.output
    groups = {g["name"]: g for g in json.loads(res.stdout)["groups"]}
    assert groups["stream"]["maps"] == "permutation"
    assert groups["h0.attn.values"]["maps"] == "4 heads, dense per head"
    assert groups["h0.attn.scores"]["maps"].startswith("4 heads in the order of h0.attn.values")
    llama = hf._prepared(_llama(transformers.LlamaConfig, transformers.LlamaForCausalLM))
    spec, _ = layout_spec("llama", llama.config.to_dict(), llama.state_dict())
    assert spec.group("layer0.attn.scores").whole_heads and spec.group("layer0.mlp").permutation
    assert spec_from_dict(json.loads(json.dumps(spec_to_dict(spec)))) == spec
    res = CliRunner().invoke(app, ["inspect", _save(llama, tmp_path / "l"), "--json"])
    info = json.loads(res.stdout)
    maps = {g["name"]: g["maps"] for g in info["groups"]}
    assert [f["norm"] for f in info["folds"]][-1] == "model.norm" and info["copies"] == []
    assert maps["layer0.attn.scores"] == "4 heads in the order of layer0.attn.values, whole heads"
    assert maps["stream"].startswith("orthogonal") and len(spec.folds) == 5  # 2 blocks, head


def test_whole_heads_move_as_wholes_with_their_units_in_order() -> None:
    """A group of whole heads (queries and keys under rotary position embeddings) given a
    map that also moves units within heads keeps only the order of heads: identity blocks."""
    from ccamerge.methods.base import Alignment, GroupAlignment
    from ccamerge.models.spec import FeatureGroup, MergeSpec
    from ccamerge.pipeline.align import constrain

    values = FeatureGroup("v", 4, (("v.weight", 0),), "o", heads=2)
    scores = FeatureGroup("s", 4, (("q.weight", 0),), "q", heads=2, follows="v", whole_heads=True)
    eye = torch.eye(4, dtype=torch.float64)
    swap = eye[[3, 2, 1, 0]]  # head 0 <-> head 1, and the units within each head reversed
    alignment = Alignment({g: GroupAlignment([eye, swap], [eye, swap.T]) for g in ("v", "s")})
    aligned = constrain(alignment, MergeSpec((values, scores)), 0, None)
    assert aligned.groups["v"].M[1].argmax(1).tolist() == [3, 2, 1, 0]  # free within heads
    assert aligned.groups["s"].M[1].argmax(1).tolist() == [2, 3, 0, 1]  # whole heads only
    assert torch.equal(aligned.groups["s"].U[1], aligned.groups["s"].M[1].T)


def test_grouped_query_attention_moves_each_query_head_with_its_key_value_head() -> None:
    """The query rows and the output projection's columns are copies of the key/value
    heads' groups; a copy's map is the group's map on every query head of a key/value
    head (checked against the map applied copy by copy)."""
    from ccamerge.maths.algebra import expand_heads
    from ccamerge.models.custom import spec_from_dict, spec_to_dict

    model = hf._prepared(
        _llama(transformers.LlamaConfig, transformers.LlamaForCausalLM, kv_heads=2)
    )
    spec, why = layout_spec("llama", model.config.to_dict(), model.state_dict())
    assert spec is not None, why
    copies = {c.name: (c.group, c.copies, c.members) for c in spec.copies}
    q, o = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight"
    assert copies["layer0.attn.queries"] == ("layer0.attn.scores", 2, ((q, 0),))
    assert copies["layer0.attn.outputs"] == ("layer0.attn.values", 2, ((o, 1),))
    assert spec.group("layer0.attn.values").heads == 2
    assert spec_from_dict(json.loads(json.dumps(spec_to_dict(spec)))) == spec
    m = torch.randn(8, 8, dtype=torch.float64)  # 2 heads of 4 units, each copied twice
    x = torch.randn(2, 2, 4, 3, dtype=torch.float64)  # (head, copy, unit, column)
    by_copy = torch.stack([(m @ x[:, c].reshape(8, 3)).reshape(2, 4, 3) for c in range(2)], 1)
    torch.testing.assert_close(expand_heads(m, 2, 2) @ x.reshape(16, 3), by_copy.reshape(16, 3))


def test_norms_fold_only_where_a_head_alone_reads_the_final_norm() -> None:
    """A base model (ViTModel with its pooler, LlamaModel) outputs its final norm: its
    norms stay unfolded and its stream takes permutations; the classification and
    language-model classes fold them."""
    vit_cfg = _vit().config
    cases = {
        "vit": (transformers.ViTModel(vit_cfg), False),
        "vit-cls": (transformers.ViTForImageClassification(vit_cfg), True),
        "llama": (_llama(transformers.LlamaConfig, transformers.LlamaModel), False),
        "llama-lm": (_llama(transformers.LlamaConfig, transformers.LlamaForCausalLM), True),
    }
    for name, (model, folds) in cases.items():
        model = hf._prepared(model)
        spec, why = layout_spec(model.config.model_type, model.config.to_dict(), model.state_dict())
        assert spec is not None, why
        assert bool(spec.folds) == folds and spec.group("stream").orthogonal == folds, name
