"""Token ids as inputs: a data file's ``input_ids`` stay integers (an embedding takes
nothing else) through every step, discovery traces the model on token ids, and the
"looks unnormalised" warning does not fire on them."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from ccamerge.cli.app import app
from ccamerge.io.files import load_data
from ccamerge.io.padding import PAD
from ccamerge.maths.algebra import permute_state_dict, random_permutations
from ccamerge.models.custom import load_factory
from ccamerge.models.discover import discover
from ccamerge.runtime.errors import DataError

FACTORY = f"{Path(__file__).parent / 'custom_nets.py'}:make_token_net"


def _ids(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 50, size=(n, 12))


def _npz(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def test_a_text_classifier_merged_from_token_ids_on_standard_input(tmp_path) -> None:
    """A text classifier merged with a copy whose hidden units are permuted, calibration
    token ids piped through ``--data -``: the merge is the original function."""
    torch.manual_seed(0)
    model = load_factory(FACTORY)()
    spec = discover(model, (12,), tokens=True).spec
    assert [g.name for g in spec.groups] == ["embed", "fc1"]  # the embedding writes units
    permuted = permute_state_dict(model.state_dict(), spec, random_permutations(spec, 1))
    paths = [tmp_path / "a.pt", tmp_path / "b.pt"]
    torch.save(model.state_dict(), paths[0])
    torch.save(permuted, paths[1])
    labels = np.random.default_rng(1).integers(0, 4, 300)
    (tmp_path / "eval.npz").write_bytes(_npz(input_ids=_ids(100, 2), y=labels[:100]))
    out = tmp_path / "merged.safetensors"
    code = "import sys; sys.argv[0] = 'ccamerge'; from ccamerge.cli import main; main()"
    command = [sys.executable, "-c", code, "merge", *map(str, paths), "--model", FACTORY,
               "--data", "-", "--eval-data", str(tmp_path / "eval.npz"), "-o", str(out),
               "--json", "-q"]  # fmt: skip
    stdin = _npz(input_ids=_ids(300, 0), attention_mask=np.ones((300, 12)), y=labels)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(command, input=stdin, capture_output=True, env=env)
    assert res.returncode == 0, res.stderr.decode()
    report = json.loads(res.stdout)
    assert report["architecture"]["config"]["input_tokens"] is True
    assert not [w for w in report["warnings"] if "unnormalised" in w]
    assert report["aligned"]["kept_averaged"] == {}
    merged = load_factory(FACTORY)()
    merged.load_state_dict(load_file(out))
    x = torch.as_tensor(_ids(64, 3))
    with torch.no_grad():
        torch.testing.assert_close(merged(x), model(x), rtol=1e-4, atol=1e-5)
    evaluation = report["evaluation"]
    assert evaluation["merged"]["accuracy"] == evaluation["models"][0]["accuracy"]


def test_inspect_traces_a_model_that_embeds_its_input_on_token_ids(tmp_path) -> None:
    """Without data (``inspect --input-shape``), an input that goes straight into an
    embedding is traced on token ids, not floats."""
    path = tmp_path / "a.pt"
    torch.save(load_factory(FACTORY)().state_dict(), path)
    res = CliRunner().invoke(
        app, ["inspect", str(path), "--model", FACTORY, "--input-shape", "12", "--json"]
    )
    assert res.exit_code == 0, res.output
    assert [g["name"] for g in json.loads(res.stdout)["groups"]] == ["embed", "fc1"]


def test_a_language_model_is_scored_on_next_tokens(tmp_path) -> None:
    """A model with (batch, length, vocabulary) logits on token ids without labels: every
    position but the last predicts the next token; the report gives next-token accuracy,
    loss and perplexity of the inputs, the ensemble and the merge (a merge with a
    hidden-permuted copy scores as the original), the check agrees on every token, and
    distillation trains every position (a merge that is already its inputs' function
    stays it)."""
    lm = f"{Path(__file__).parent / 'custom_nets.py'}:make_token_lm"
    torch.manual_seed(0)
    model = load_factory(lm)()
    spec = discover(model, (12,), tokens=True).spec
    permuted = permute_state_dict(model.state_dict(), spec, random_permutations(spec, 1))
    paths = [tmp_path / "a.pt", tmp_path / "b.pt"]
    torch.save(model.state_dict(), paths[0])
    torch.save(permuted, paths[1])
    (tmp_path / "calib.npz").write_bytes(_npz(input_ids=_ids(300, 0)))
    (tmp_path / "eval.npz").write_bytes(_npz(input_ids=_ids(100, 2)))
    args = ["merge", *map(str, paths), "--model", lm, "--data", str(tmp_path / "calib.npz"),
            "--eval-data", str(tmp_path / "eval.npz"), "--json", "-q"]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    evaluation = report["evaluation"]
    assert evaluation["predicted_tokens"] == 100 * 11
    ids = torch.as_tensor(_ids(100, 2))
    with torch.no_grad():
        logits = model(ids)[:, :-1].reshape(-1, 50).double()
    loss = float(torch.nn.functional.cross_entropy(logits, ids[:, 1:].reshape(-1)))
    for row in (evaluation["models"][0], evaluation["merged"]):
        assert row["loss"] == pytest.approx(loss, rel=1e-5)
        assert row["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert report["check"]["merged"]["top1_agreement"] == 1.0
    assert report["check"]["num_samples"] == 64 * 11  # the least held out (64) x next tokens
    res = CliRunner().invoke(app, [*args, "--distill", "2"])  # every position distilled
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["distill"]["epochs_run"] == 2  # the merge is its inputs' function: the
    assert report["evaluation"]["merged"]["loss"] == pytest.approx(loss, rel=1e-4)  # same


def test_token_ids_are_read_as_int64_and_checked(tmp_path) -> None:
    path = tmp_path / "t.npz"
    path.write_bytes(_npz(input_ids=_ids(5, 0).astype(np.int32)))
    data = load_data(path)
    assert data.tokens and data.x.dtype == torch.int64 and data.scale_warning("data") is None
    images = tmp_path / "images.npz"
    images.write_bytes(_npz(x=np.full((5, 3), 255, dtype=np.uint8)))
    assert not load_data(images).tokens and load_data(images).x.dtype == torch.float32
    bad = {
        "not integers": dict(input_ids=np.ones((4, 3))),
        "negative token ids": dict(input_ids=-np.ones((4, 3), dtype=np.int64)),
        "other than 0 and 1": dict(input_ids=_ids(4, 0), attention_mask=np.full((4, 12), 2)),
        "attention_mask of shape": dict(input_ids=_ids(4, 0), attention_mask=np.ones((4, 3))),
    }
    for message, arrays in bad.items():
        path.write_bytes(_npz(**arrays))
        with pytest.raises(DataError, match=message):
            load_data(path)


def test_an_attention_mask_marks_padded_positions_in_the_ids(tmp_path) -> None:
    """Padding (mask 0) becomes PAD in the ids; the real tokens are kept as they are."""
    ids, mask = _ids(4, 0), np.ones((4, 12), dtype=np.int64)
    mask[1, 7:] = 0
    mask[3, 2:] = 0
    path = tmp_path / "padded.npz"
    path.write_bytes(_npz(input_ids=ids, attention_mask=mask))
    x = load_data(path).x
    assert torch.equal(x == PAD, torch.from_numpy(mask == 0))
    assert torch.equal(x[x != PAD], torch.from_numpy(ids[mask == 1]))
