"""Hugging Face folders in and out without ``--model``: a folder with config.json is built
with ``transformers`` from its config and read by its class's ``from_pretrained``; the
merged ``-o DIR/`` holds the inputs' file layout and loads back with ``from_pretrained``,
giving the numbers the report gave. No network: every model is built from a config."""

from __future__ import annotations

import io
import json
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from ccamerge.cli.app import app
from ccamerge.models.hf import HF_EXTRA
from ccamerge.pipeline import load_models
from ccamerge.runtime.errors import ArchitectureError, CheckpointError

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

VOCAB = 40


def _gpt2(**overrides):
    cfg = dict(n_layer=2, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=16)
    return transformers.GPT2LMHeadModel(
        transformers.GPT2Config(**{**cfg, **overrides}, bos_token_id=0, eos_token_id=0)
    )


def _vit():
    cfg = transformers.ViTConfig(
        num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=32,
        image_size=8, patch_size=4, num_channels=1, num_labels=5,
    )  # fmt: skip
    return transformers.ViTForImageClassification(cfg)


def _save(model, folder, seed: int):
    torch.manual_seed(seed)
    model.apply(model._init_weights)  # a different seed's weights
    model.save_pretrained(folder)
    return folder


def _npz(path, **arrays):
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    path.write_bytes(buffer.getvalue())
    return str(path)


def _keys(folder) -> list[str]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return sorted(f.keys())


def _merge(*args: str) -> dict:
    res = CliRunner().invoke(app, ["merge", *args, "--json", "-q"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_a_gpt2_folder_pair_merges_and_loads_back_with_from_pretrained(tmp_path) -> None:
    """Two GPT-2 folders (tied embeddings, Conv1D layers) merge without --model into a
    folder with the inputs' tensor names (the tied head written once) and config.json;
    ``from_pretrained`` gives the reported next-token loss; the family's layout aligns
    the model, and the refit runs layer by layer through module hooks (torch.fx cannot
    trace it), every fit lowering its residual."""
    folders = [_save(_gpt2(), tmp_path / f"g{k}", k) for k in range(2)]
    rng = np.random.default_rng(0)
    calib = _npz(tmp_path / "calib.npz", input_ids=rng.integers(0, VOCAB, (200, 12)))
    ids = rng.integers(0, VOCAB, (50, 12))
    evaluation = _npz(tmp_path / "eval.npz", input_ids=ids)
    out = tmp_path / "out"
    report = _merge(*map(str, folders), "--data", calib, "--eval-data", evaluation, "-o", f"{out}/")
    assert report["architecture"]["name"] == "huggingface"
    assert report["architecture"]["config"]["class"] == "GPT2LMHeadModel"
    assert report["method"] == "cca" and report["aligned"]["fraction"] > 0.9
    assert any("layer by layer through module hooks" in w for w in report["warnings"])
    assert report["refit"]["mode"] == "module hooks"
    layers = report["refit"]["layers"]  # every Conv1D and LayerNorm, in forward order
    assert [x["name"] for x in layers][:3] == [
        "transformer.h.0.ln_1", "transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj"
    ]  # fmt: skip
    assert len(layers) == 2 * 6 + 1  # per block: 2 norms, 4 layers; the final norm (the
    # head, tied to the token embedding, is not refitted)
    assert all(x["residual_after"] <= x["residual_before"] + 1e-9 for x in layers)
    assert _keys(out) == _keys(folders[0]) and "lm_head.weight" not in _keys(out)
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (folders[0] / "config.json").read_text()
    )
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert merged.lm_head.weight.data_ptr() == merged.transformer.wte.weight.data_ptr()
    ids = torch.as_tensor(ids)
    with torch.no_grad():
        logits = merged(ids).logits[:, :-1].reshape(-1, VOCAB).double()
    loss = float(torch.nn.functional.cross_entropy(logits, ids[:, 1:].reshape(-1)))
    assert report["evaluation"]["merged"]["loss"] == pytest.approx(loss, rel=1e-6)


def _neox():
    cfg = transformers.GPTNeoXConfig(
        num_hidden_layers=1, hidden_size=16, intermediate_size=32, num_attention_heads=2,
        vocab_size=VOCAB, max_position_embeddings=32,
    )  # fmt: skip
    return transformers.GPTNeoXForCausalLM(cfg)


def test_a_family_without_a_layout_is_averaged_and_the_report_says_so(tmp_path) -> None:
    """GPT-NeoX has no layout in ccamerge and torch.fx cannot trace it: its folders are averaged
    as they are (``--no-refit``: tensor by tensor) or then refitted, the method is
    reported as plain averaging, a warning says why, and ``barrier`` draws only the
    average path."""
    folders = [str(_save(_neox(), tmp_path / f"o{k}", k)) for k in range(2)]
    ids = np.random.default_rng(0).integers(0, VOCAB, (100, 12))
    calib = _npz(tmp_path / "calib.npz", input_ids=ids)
    out = tmp_path / "out"
    report = _merge(*folders, "--data", calib, "-o", f"{tmp_path / 'refitted'}/")
    assert report["method"] == "average" and report["refit"]["mode"] == "module hooks"
    report = _merge(*folders, "--data", calib, "--no-refit", "-o", f"{out}/")
    assert report["method"] == "average" and report["aligned"]["fraction"] == 0.0
    assert any("no feature group found" in w for w in report["warnings"])
    merged = transformers.GPTNeoXForCausalLM.from_pretrained(str(out)).state_dict()
    inputs = [transformers.GPTNeoXForCausalLM.from_pretrained(f).state_dict() for f in folders]
    for name, tensor in merged.items():
        mean = (inputs[0][name] + inputs[1][name]) / 2
        torch.testing.assert_close(tensor, mean, rtol=1e-6, atol=1e-7)
    res = CliRunner().invoke(
        app, ["barrier", *folders, "--data", calib, "--eval-data", calib, "--steps", "2", "--json"]
    )
    assert res.exit_code == 0, res.output
    assert list(json.loads(res.stdout)["methods"]) == ["average"]
    assert "only the average path is drawn" in res.stderr


def test_a_vit_folder_is_written_in_its_files_layout(tmp_path) -> None:
    """transformers may name a model's tensors otherwise than its files do (ViT's
    ``vit.encoder.layer.*`` on disk): the merged folder holds the files' names, and a model
    merged with itself is returned unchanged with the reported accuracy."""
    folder = _save(_vit(), tmp_path / "v", 0)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((120, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 5, 120)
    data = _npz(tmp_path / "data.npz", x=x, y=y)
    out = tmp_path / "out"
    report = _merge(str(folder), str(folder), "--data", data, "--eval-data", data, "-o", f"{out}/")
    assert _keys(out) == _keys(folder)
    merged = transformers.ViTForImageClassification.from_pretrained(str(out)).eval()
    original = transformers.ViTForImageClassification.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        logits = merged(torch.as_tensor(x)).logits
        torch.testing.assert_close(logits, original(torch.as_tensor(x)).logits)
    accuracy = float((logits.argmax(1) == torch.as_tensor(y)).float().mean())
    assert report["evaluation"]["merged"]["accuracy"] == pytest.approx(accuracy)


def _folder_with_config(tmp_path, **changes):
    folder = _save(_gpt2(), tmp_path / "g", 0)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return str(folder)


def test_a_config_asking_for_its_own_code_is_refused(tmp_path) -> None:
    folder = _folder_with_config(tmp_path, auto_map={"AutoModel": "modeling_x.Model"})
    with pytest.raises(ArchitectureError, match="never runs code from a checkpoint"):
        load_models([folder, folder])


def test_a_class_transformers_does_not_know_is_refused(tmp_path) -> None:
    folder = _folder_with_config(tmp_path, architectures=["os.system"])
    with pytest.raises(ArchitectureError, match="not a class of the installed transformers"):
        load_models([folder, folder])


def test_weights_transformers_would_initialise_at_random_are_an_error(tmp_path) -> None:
    """A folder whose config asks for more layers than its weights hold."""
    folder = _folder_with_config(tmp_path, n_layer=3)
    with pytest.raises(CheckpointError, match="at random"):
        load_models([folder, folder])


def test_folders_of_different_configs_do_not_merge(tmp_path) -> None:
    a = _save(_gpt2(), tmp_path / "a", 0)
    b = _save(_gpt2(n_layer=1), tmp_path / "b", 1)
    with pytest.raises(ArchitectureError, match="does not match"):
        load_models([str(a), str(b)])


def test_without_transformers_the_error_names_the_extra(tmp_path, monkeypatch) -> None:
    folder = str(_save(_gpt2(), tmp_path / "g", 0))
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers fails
    with pytest.raises(ArchitectureError, match=HF_EXTRA.replace("[", r"\[").replace("]", r"\]")):
        load_models([folder, folder])


def test_apply_and_barrier_take_hf_folders(tmp_path) -> None:
    """``apply`` with the merge's transforms writes the same tensors and config.json into
    a folder; ``barrier`` draws every method's path, scored on next tokens."""
    folders = [str(_save(_gpt2(), tmp_path / f"g{k}", k)) for k in range(2)]
    ids = np.random.default_rng(2).integers(0, VOCAB, (200, 12))
    calib = _npz(tmp_path / "calib.npz", input_ids=ids)
    merged, applied = tmp_path / "merged", tmp_path / "applied"
    transforms = str(tmp_path / "t.safetensors")
    _merge(*folders, "--data", calib, "-o", f"{merged}/", "--save-transforms", transforms)
    res = CliRunner().invoke(
        app, ["apply", *folders, "--transforms", transforms, "--data", calib, "-o", f"{applied}/"]
    )
    assert res.exit_code == 0, res.output
    assert (applied / "config.json").read_bytes() == (tmp_path / "g0" / "config.json").read_bytes()
    with safe_open(str(merged / "model.safetensors"), "pt") as a:
        with safe_open(str(applied / "model.safetensors"), "pt") as b:
            assert sorted(a.keys()) == sorted(b.keys())
            for k in a.keys():
                assert torch.equal(a.get_tensor(k), b.get_tensor(k))
    res = CliRunner().invoke(
        app, ["barrier", *folders, "--data", calib, "--eval-data", calib, "--steps", "3", "--json"]
    )
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert list(report["methods"]) == ["average", "permute", "cca"]
    assert report["predicted_tokens"] == 200 * 11  # a language model: scored on next tokens


def test_bfloat16_sharded_folders_merge_into_bfloat16(tmp_path) -> None:
    """Sharded bfloat16 folders (``max_shard_size``) read as one checkpoint each; the
    merged folder keeps their dtype and names."""
    folders = []
    for k in range(2):
        model = _gpt2()
        torch.manual_seed(k)
        model.apply(model._init_weights)
        model.to(torch.bfloat16).save_pretrained(tmp_path / f"h{k}", max_shard_size="4KB")
        folders.append(tmp_path / f"h{k}")
    assert (folders[0] / "model.safetensors.index.json").is_file()
    ids = np.random.default_rng(3).integers(0, VOCAB, (200, 12))
    calib = _npz(tmp_path / "calib.npz", input_ids=ids)
    out = tmp_path / "out"
    _merge(*map(str, folders), "--data", calib, "-o", f"{out}/")
    single = transformers.GPT2LMHeadModel.from_pretrained(str(folders[0]))
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
        assert set(f.keys()) == set(single.state_dict()) - {"lm_head.weight"}


def test_the_callers_transformers_logging_is_left_as_it_was(tmp_path) -> None:
    """ccamerge silences transformers' notes and progress bars only while it calls it."""
    folder = _save(_gpt2(), tmp_path / "g", 0)
    transformers.logging.set_verbosity_info()
    transformers.logging.enable_progress_bar()
    try:
        loaded = load_models([str(folder)])
        loaded.detected.arch.saved_tensors(loaded.detected.config, loaded.state_dicts[0])
        assert transformers.logging.get_verbosity() == transformers.logging.INFO
        assert transformers.utils.logging.is_progress_bar_enabled()
    finally:
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
