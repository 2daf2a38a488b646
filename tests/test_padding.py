"""Padded token data (an ``attention_mask`` with zeros) reaches Hugging Face models as
input_ids and attention_mask, and every statistic, fit and score leaves the padded
positions out: on right-padded batches they equal the same computations on each
sequence cut to its real length, fed alone."""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from attention_nets import TOKENS, make_net
from attention_nets import VOCAB as ATTENTION_VOCAB
from typer.testing import CliRunner

from ccamerge.cli.app import app
from ccamerge.io.files import Dataset, load_data
from ccamerge.io.padding import PAD
from ccamerge.maths.refit import RefitSettings, refit
from ccamerge.maths.stats import collect_statistics
from ccamerge.methods.base import identity_alignment
from ccamerge.models import hf
from ccamerge.models.hf_layouts import layout_spec, native_layout
from ccamerge.pipeline.evaluate import labels_of, predict_logits, score_logits

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

VOCAB = 40
LENGTHS = [10, 4, 7, 10, 2, 9]  # real tokens of each sequence, right-padded to 10


def _gpt2(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=16, n_head=4, vocab_size=VOCAB, n_positions=16, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    return hf._prepared(transformers.GPT2LMHeadModel(cfg))


def _bert(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        num_hidden_layers=2, hidden_size=16, num_attention_heads=4, intermediate_size=32,
        vocab_size=VOCAB, max_position_embeddings=16, num_labels=3,
    )  # fmt: skip
    return hf._prepared(transformers.BertForMaskedLM(cfg))


def _opt(seed: int = 0):
    """OPT's MLP reads its positions flattened to (batch * length, width)."""
    torch.manual_seed(seed)
    cfg = transformers.OPTConfig(
        num_hidden_layers=2, hidden_size=16, num_attention_heads=4, ffn_dim=32,
        vocab_size=VOCAB, max_position_embeddings=16, word_embed_proj_dim=16,
    )  # fmt: skip
    return hf._prepared(transformers.OPTForCausalLM(cfg))


BUILDS = {"gpt2": _gpt2, "bert": _bert, "opt": _opt}


def _padded(lengths=LENGTHS, width: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, (len(lengths), width))
    mask = (np.arange(width)[None] < np.array(lengths)[:, None]).astype(np.int64)
    return ids, mask


def _read(tmp_path, name: str, **arrays) -> Dataset:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    path = tmp_path / name
    path.write_bytes(buffer.getvalue())
    return load_data(path)


def _cut(data: Dataset) -> list[torch.Tensor]:
    """Each sequence at its real length, as a batch of one."""
    return [row[row != PAD][None] for row in data.x]


@pytest.mark.parametrize("family", BUILDS)
def test_statistics_leave_padded_positions_out(tmp_path, family) -> None:
    model = BUILDS[family]()
    spec, why = layout_spec(model.config.model_type, model.config.to_dict(), model.state_dict())
    assert spec is not None, why
    data = _read(tmp_path, "p.npz", **dict(zip(("input_ids", "attention_mask"), _padded())))
    padded = collect_statistics([model], spec, [data.x])
    cut = collect_statistics([model], spec, _cut(data))
    for name, acc in padded.groups.items():
        other = cut.groups[name]
        torch.testing.assert_close(acc.mean_of(0), other.mean_of(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(acc.block(0, 0), other.block(0, 0), rtol=1e-4, atol=1e-6)
    everything = collect_statistics([model], spec, [torch.as_tensor(_padded()[0])])
    assert not torch.allclose(
        everything.groups["stream"].mean_of(0), cut.groups["stream"].mean_of(0)
    )


def test_next_token_scores_leave_padded_positions_out(tmp_path) -> None:
    model = _gpt2()
    data = _read(tmp_path, "p.npz", **dict(zip(("input_ids", "attention_mask"), _padded())))
    logits, labels = predict_logits(model, data, batch_size=4), labels_of(data)
    assert logits.shape[0] == labels.shape[0] == sum(n - 1 for n in LENGTHS)
    score = score_logits(logits, labels, next_token=True)
    total, correct = 0.0, 0
    with torch.no_grad():
        for seq in _cut(data):
            out = model(seq).logits[0, :-1]
            total += float(F.cross_entropy(out.double(), seq[0, 1:], reduction="sum"))
            correct += int((out.argmax(1) == seq[0, 1:]).sum())
    rows = sum(n - 1 for n in LENGTHS)
    assert score.loss == pytest.approx(total / rows, rel=1e-5)
    assert score.accuracy == pytest.approx(correct / rows)


def test_the_refit_fits_on_real_positions_only(tmp_path) -> None:
    """Two different models, averaged and refitted (through module hooks): on padded
    batches the fit equals the fit on the cut sequences."""
    models = [_gpt2(0), _gpt2(1)]
    spec = layout_spec("gpt2", models[0].config.to_dict(), models[0].state_dict())[0]
    lengths = LENGTHS * 6
    data = _read(tmp_path, "p.npz", **dict(zip(("input_ids", "attention_mask"), _padded(lengths))))
    fitted = []
    for batches in ([data.x[:18], data.x[18:]], _cut(data)):
        merged = copy.deepcopy(models[0])
        average = {k: (v + models[1].state_dict()[k]) / 2 for k, v in merged.state_dict().items()}
        merged.load_state_dict(average)
        report = refit(
            merged, models, spec, identity_alignment(spec, 2), [0.5, 0.5],
            lambda b=batches: iter(b), RefitSettings(),
        )  # fmt: skip
        assert report.mode == "module hooks" and report.layers
        assert report.layers[0].samples == sum(lengths)
        fitted.append(merged.state_dict())
    for name, tensor in fitted[0].items():
        torch.testing.assert_close(tensor, fitted[1][name], rtol=1e-3, atol=1e-4, msg=name)


def _save(model, folder) -> str:
    native_layout(model).save_pretrained(folder)
    return str(folder)


def _npz(path, ids, mask) -> str:
    np.savez(path, input_ids=ids, attention_mask=mask)
    return str(path)


def test_a_gpt2_pair_merges_on_padded_data_with_honest_scores(tmp_path) -> None:
    """Merged (with the refit and a distillation epoch) and evaluated on padded data:
    the scores count real next tokens only, and equal the merged folder's own scores on
    the cut sequences."""
    a, b = _save(_gpt2(0), tmp_path / "a"), _save(_gpt2(1), tmp_path / "b")
    calib = _npz(tmp_path / "calib.npz", *_padded(LENGTHS * 30, seed=1))
    test = _npz(tmp_path / "test.npz", *_padded(LENGTHS * 5, seed=2))
    out = tmp_path / "out"
    res = CliRunner().invoke(
        app,
        ["merge", a, b, "--data", calib, "--eval-data", test, "--distill", "1", "-o",
         f"{out}/", "--json", "-q"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["evaluation"]["predicted_tokens"] == 5 * sum(n - 1 for n in LENGTHS)
    assert report["check"]["num_samples"] > 0
    merged = transformers.GPT2LMHeadModel.from_pretrained(str(out)).eval()
    data = load_data(test)
    total, rows = 0.0, 0
    with torch.no_grad():
        for seq in _cut(data):
            out_logits = merged(seq).logits[0, :-1]
            total += float(F.cross_entropy(out_logits.double(), seq[0, 1:], reduction="sum"))
            rows += seq.shape[1] - 1
    assert report["evaluation"]["merged"]["loss"] == pytest.approx(total / rows, rel=1e-4)


def test_padded_data_for_a_model_without_an_attention_mask_is_refused(tmp_path) -> None:
    """A --model factory's forward takes one tensor: padded data is a one-line error."""
    factory = f"{Path(__file__).parent / 'attention_nets.py'}:make_net"
    state = tmp_path / "a.pt"
    torch.save(make_net("token_lm").state_dict(), state)
    ids, mask = _padded([6, 3, 5, 6, 2, 4] * 20, width=TOKENS)
    calib = _npz(tmp_path / "calib.npz", ids % ATTENTION_VOCAB, mask)
    res = CliRunner().invoke(
        app,
        ["merge", str(state), str(state), "--model", factory, "--model-args",
         '{"name": "token_lm"}', "--data", calib, "-o", str(tmp_path / "m.safetensors")],
    )  # fmt: skip
    assert res.exit_code == 1, res.output
    assert "only Hugging Face models take an attention mask" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "m.safetensors").exists()
