"""Hugging Face transformers (built from configs) merged from folders without ``--model``
(docs/benchmarks.md, "Hugging Face transformers").

* **ViT** on Fashion-MNIST (28 px, patches of 7, width 64, 3 layers, 4 heads): four
  models trained from scratch with different seeds, merged N = 2 and N = 4; and two
  fine-tunes of one base model (trained on disjoint halves of further data).
* **GPT-2** as a byte-level language model (width 64, 2 layers, 4 heads, context 64) on
  the Python standard library's sources (800 steps of 64 windows): four seeds, N = 2
  and 4, scored by next-byte accuracy and perplexity on held-out files.
* **Llama** (width 64, 2 layers, 4 heads, MLP 128: rotary attention, a gated MLP,
  RMSNorm) on GPT-2's task (``--only llama``), distilled as GPT-2 is; the same with
  grouped-query attention, 2 key/value heads for the 4 query heads (``--only llama-gqa``).
* **BERT** (2 layers, width 64, 4 heads) classifying 64-byte windows of four standard
  library packages by package (email, asyncio, xml, multiprocessing; 15000 windows
  each, the last quarter of each package's files held out for 4000 test windows): four
  seeds, N = 2 and 4; and the same task on windows cut to random lengths of 16-64 bytes
  and right-padded (``--only bert-padded``: the calibration file has an
  ``attention_mask``).

Each set is written with ``save_pretrained``, merged with every method (the default,
``cca``, as a user runs it; ``permute``; plain ``average``), and the merged folder is
loaded back with ``from_pretrained`` and scored beside the inputs and their ensemble (the
mean of their logits). torch.fx cannot trace transformers' models, so the refit runs
layer by layer through module hooks; the default merge is also run with ``--no-refit``.
The ViT and GPT-2 sets are merged again with ``--distill auto`` (on 10000 unlabelled
training images; 5000 unlabelled windows). One thread.

    python benchmarks/hf_transformers.py [--out benchmarks/results/hf_transformers.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from fmnist import prepare, splits

from ccamerge.io.padding import PAD, accept_padding

torch.set_num_threads(1)
METHODS = ("cca", "permute", "average")
CONTEXT = 64


def vit(transformers):
    config = transformers.ViTConfig(
        image_size=28, patch_size=7, num_channels=1, hidden_size=64, num_hidden_layers=3,
        num_attention_heads=4, intermediate_size=128, num_labels=10,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return transformers.ViTForImageClassification(config)


def gpt2(transformers):
    config = transformers.GPT2Config(
        vocab_size=256, n_positions=CONTEXT, n_embd=64, n_layer=2, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def train(model, x, y, seed: int, steps: int, lr: float, loss_of, batch: int = 128):
    """AdamW with a one-cycle schedule (``y`` None: a language model)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    model.train()
    order = torch.randperm(len(x), generator=g)
    for step in range(steps):
        k = (step * batch) % (len(x) - batch + 1)
        if k < batch and step:
            order = torch.randperm(len(x), generator=g)
        idx = order[k : k + batch]
        loss = loss_of(model, x[idx], None if y is None else y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def classify_loss(model, x, y):
    return F.cross_entropy(model(x).logits, y)


def lm_loss(model, x, y):
    out = model(x).logits[:, :-1]
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), x[:, 1:].reshape(-1))


@torch.no_grad()
def logits(model, x):
    """Logits of every scored row: a sample, or (a language model) every position but
    the last."""
    outs = []
    for k in range(0, len(x), 500):
        out = model(x[k : k + 500]).logits
        outs.append(out[:, :-1].reshape(-1, out.shape[-1]) if out.ndim == 3 else out)
    return torch.cat(outs)


def score(lg, y) -> dict:
    loss = float(F.cross_entropy(lg.double(), y))
    accuracy = round(100 * float((lg.argmax(1) == y).float().mean()), 2)
    return {"accuracy": accuracy, "perplexity": round(math.exp(loss), 3)}


def run_set(name, models, calib, test, root: Path, merge, **options) -> dict:
    """Merge ``models`` (written as folders) with ``options``; score the written folder."""
    folders = []
    for k, m in enumerate(models):
        folders.append(str(root / f"{name}-{k}"))
        if not Path(folders[-1]).exists():
            m.save_pretrained(folders[-1])
    out = root / f"{name}-merged"
    start = time.perf_counter()
    result = merge(folders, data=str(calib), output=f"{out}/", force=True, **options)
    seconds = time.perf_counter() - start
    merged = accept_padding(type(models[0]).from_pretrained(str(out))).eval()
    x, y = test
    ins = [logits(m.eval(), x) for m in models]
    return result_row(name, options, result.report, seconds, ins, logits(merged, x), y)


def result_row(name, options, report, seconds, ins, merged, y) -> dict:
    """One merge's row: its options and report, the test scores of the inputs (their
    logits ``ins``), of their ensemble and of the merge (``merged``)."""
    distill = report.get("distill")
    return {
        "set": name,
        "n": len(ins),
        "options": {
            k: Path(v).name if k.endswith("_data") or k == "spec" else v for k, v in options.items()
        },
        "method": report["method"],
        "aligned_fraction": round(report["aligned"]["fraction"], 3),
        "distill_epochs": None
        if distill is None
        else [distill["epochs_run"], distill["epoch_kept"]],
        "inputs": [score(lg, y) for lg in ins],
        "ensemble": score(sum(ins) / len(ins), y),
        "merged": score(merged, y),
        "check_beaten_by": len(report.get("check", {}).get("beaten_by", [])),
        "merge_seconds": round(seconds, 1),
    }


def permutation_stream_spec(folder: str, root: Path) -> Path | None:
    """A spec file of ``folder``'s layout with the residual stream aligned by
    permutations and no norm folded, when its layout folds the norms (the stream then
    takes orthogonal maps by default); None otherwise."""
    from dataclasses import replace

    from ccamerge.models.custom import save_spec
    from ccamerge.models.spec import MergeSpec
    from ccamerge.pipeline.load import load_models

    spec = load_models([folder]).spec
    if not spec.folds:
        return None
    groups = tuple(
        replace(g, permutation=True, orthogonal=False) if g.orthogonal else g for g in spec.groups
    )
    path = root / "permutation-stream.json"
    save_spec(path, MergeSpec(groups, spec.concats, spec.copies))
    return path


def seed_rows(name, sets, calib, test, root: Path, merge, **extra) -> list[dict]:
    """Every method with the refit, the default without it, and each of ``extra``'s
    option sets, on each set of models; where the layout folds the norms, the default
    again with the stream aligned by permutations (a spec file)."""
    rows = []
    for models in sets:
        tag = f"{name} n{len(models)}"
        runs = [{"method": m} for m in METHODS] + [{"refit": False}] + list(extra.values())
        rows += [run_set(tag, models, calib, test, root, merge, **options) for options in runs]
        permutations = permutation_stream_spec(str(root / f"{tag}-0"), root)
        if permutations is not None:
            rows.append(run_set(tag, models, calib, test, root, merge, spec=str(permutations)))
    return rows


@dataclass
class ViTData:
    """Fashion-MNIST as the ViT benchmarks take it: images ``(n, 1, 28, 28)``, the 20000
    training images every seed trains on (``base_idx``) and the rest, the calibration file
    (2000 labelled images), the test set, and 10000 further training images without labels
    (``unlabelled``, a ``.npy``)."""

    images: torch.Tensor
    labels: torch.Tensor
    base_idx: torch.Tensor
    rest: torch.Tensor
    calib: Path
    test: tuple[torch.Tensor, torch.Tensor]
    unlabelled: Path


def vit_data(root: Path) -> ViTData:
    data = prepare("flat")
    split = splits()
    images = torch.as_tensor(data["train_x"]).reshape(-1, 1, 28, 28)
    labels = torch.as_tensor(data["train_y"])
    train_idx = torch.as_tensor(split["train"])
    calib = root / "vit-calib.npz"
    calib_idx = torch.as_tensor(split["calib"][:2000])
    np.savez(calib, x=images[calib_idx].numpy(), y=labels[calib_idx].numpy())
    test = torch.as_tensor(data["test_x"]).reshape(-1, 1, 28, 28), torch.as_tensor(data["test_y"])
    unlabelled = root / "unlabelled.npy"
    np.save(unlabelled, images[train_idx[20000:][:10000]].numpy())
    return ViTData(images, labels, train_idx[:20000], train_idx[20000:], calib, test, unlabelled)


def vit_seeds(build, data: ViTData, loss_of) -> list:
    """Four models (seeds 1-4) trained two epochs on ``data.base_idx``, AdamW 2e-3."""
    x, y = data.images[data.base_idx], data.labels[data.base_idx]
    seeds = []
    for seed in (1, 2, 3, 4):
        torch.manual_seed(seed)
        seeds.append(train(build(), x, y, seed, 2 * len(x) // 128, 2e-3, loss_of))
    return seeds


def vit_sets(transformers, root: Path, merge) -> list[dict]:
    data = vit_data(root)
    images, labels, rest = data.images, data.labels, data.rest
    halves = rest[: len(rest) // 2], rest[len(rest) // 2 :]

    def fit(model, idx, seed, n_steps, lr):
        return train(model, images[idx], labels[idx], seed, n_steps, lr, classify_loss)

    torch.manual_seed(0)
    base = fit(vit(transformers), data.base_idx, 0, 2 * len(data.base_idx) // 128, 2e-3)
    tunes = []
    for k, half in enumerate(halves):
        tune = vit(transformers)
        tune.load_state_dict(base.state_dict())
        tunes.append(fit(tune, half, 10 + k, len(half) // 128, 5e-4))
    seeds = vit_seeds(lambda: vit(transformers), data, classify_loss)
    distilled = {"distill": "auto", "distill_data": str(data.unlabelled)}
    calib, test = data.calib, data.test
    rows = seed_rows("vit fine-tunes", [tunes], calib, test, root, merge, distill=distilled)
    return rows + seed_rows(
        "vit seeds", [seeds[:2], seeds], calib, test, root, merge, distill=distilled
    )


def stdlib_bytes() -> tuple[np.ndarray, np.ndarray]:
    """The standard library's top-level ``.py`` files as bytes: files in sorted order, the
    first 90% for training and calibration, the rest held out for the test."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    cut = int(0.9 * len(files))
    parts = [b"".join(f.read_bytes() for f in group) for group in (files[:cut], files[cut:])]
    return tuple(np.frombuffer(p, dtype=np.uint8) for p in parts)


def windows(text: np.ndarray, n: int, seed: int) -> torch.Tensor:
    starts = np.random.default_rng(seed).integers(0, len(text) - CONTEXT, n)
    return torch.as_tensor(np.stack([text[s : s + CONTEXT] for s in starts]).astype(np.int64))


def gpt2_sets(transformers, root: Path, merge) -> list[dict]:
    train_text, test_text = stdlib_bytes()
    x = windows(train_text, 60_000, 0)
    calib = root / "lm-calib.npz"
    np.savez(calib, input_ids=windows(train_text, 500, 1).numpy())  # 31500 next bytes
    test_x = windows(test_text, 2000, 2)
    test = test_x, test_x[:, 1:].reshape(-1)
    seeds = []
    for seed in (1, 2, 3, 4):
        torch.manual_seed(seed)
        seeds.append(train(gpt2(transformers), x, None, seed, 800, 3e-3, lm_loss, batch=64))
    unlabelled = root / "lm-unlabelled.npz"  # 5000 training windows, no labels
    np.savez(unlabelled, input_ids=windows(train_text, 5000, 3).numpy())
    distilled = {"distill": "auto", "distill_data": str(unlabelled)}
    return seed_rows("gpt2 seeds", [seeds[:2], seeds], calib, test, root, merge, distill=distilled)


def llama(transformers, kv_heads: int = 4):
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=CONTEXT,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def llama_sets(transformers, root: Path, merge, kv_heads: int = 4) -> list[dict]:
    """GPT-2's byte-level task with a Llama (rotary attention, gated MLP, RMSNorm) of
    ``kv_heads`` key/value heads for its 4 query heads."""
    train_text, test_text = stdlib_bytes()
    x = windows(train_text, 60_000, 0)
    calib = root / "llama-calib.npz"
    np.savez(calib, input_ids=windows(train_text, 500, 1).numpy())
    test_x = windows(test_text, 2000, 2)
    seeds = []
    for seed in (1, 2, 3, 4):
        torch.manual_seed(seed)
        model = llama(transformers, kv_heads)
        seeds.append(train(model, x, None, seed, 800, 3e-3, lm_loss, batch=64))
    test = test_x, test_x[:, 1:].reshape(-1)
    unlabelled = root / "llama-unlabelled.npz"  # 5000 training windows, no labels
    np.savez(unlabelled, input_ids=windows(train_text, 5000, 3).numpy())
    distilled = {"distill": "auto", "distill_data": str(unlabelled)}
    name = "llama seeds" if kv_heads == 4 else f"llama seeds, {kv_heads} key/value heads"
    return seed_rows(name, [seeds[:2], seeds], calib, test, root, merge, distill=distilled)


def bert(transformers):
    config = transformers.BertConfig(
        vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=CONTEXT, num_labels=len(PACKAGES),
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(config)


PACKAGES = ("email", "asyncio", "xml", "multiprocessing")  # the classes of the BERT task


def package_windows(n: int, held_out: bool, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` byte windows per package of :data:`PACKAGES`, labelled by package: from the
    first 75 % of each package's files, or (``held_out``) from the rest."""
    root = Path(sysconfig.get_paths()["stdlib"])
    xs, ys = [], []
    for label, package in enumerate(PACKAGES):
        files = sorted((root / package).rglob("*.py"))
        cut = int(0.75 * len(files))
        text = b"".join(f.read_bytes() for f in (files[cut:] if held_out else files[:cut]))
        xs.append(windows(np.frombuffer(text, dtype=np.uint8), n, seed + label))
        ys.append(torch.full((n,), label))
    return torch.cat(xs), torch.cat(ys)


def padded(x: torch.Tensor, seed: int) -> torch.Tensor:
    """``x``'s windows cut to random lengths of 16 to 64 bytes, right-padded: the
    positions after a window's length hold ccamerge's PAD (models made to take it with
    ``accept_padding`` get them as an attention mask)."""
    lengths = torch.randint(
        16, CONTEXT + 1, (len(x), 1), generator=torch.Generator().manual_seed(seed)
    )
    return x.masked_fill(torch.arange(CONTEXT)[None] >= lengths, PAD)


def bert_sets(transformers, root: Path, merge, pad: bool = False) -> list[dict]:
    """The BERT sets; ``pad``: every window cut to a random length and right-padded
    (calibration file: ``input_ids`` with an ``attention_mask``)."""
    cut = (lambda x, seed: padded(x, seed)) if pad else (lambda x, seed: x)
    x, y = package_windows(15000, False, 0)
    x = cut(x, 0)
    calib = root / ("bert-padded-calib.npz" if pad else "bert-calib.npz")
    cx, cy = package_windows(500, False, 100)  # 2000 labelled windows
    cx = cut(cx, 100)
    np.savez(
        calib, input_ids=cx.clamp_min(0).numpy(), attention_mask=(cx != PAD).numpy(), y=cy.numpy()
    )
    tx, ty = package_windows(1000, True, 200)
    test = cut(tx, 200), ty
    seeds = []
    for seed in (1, 2, 3, 4):
        torch.manual_seed(seed)
        model = accept_padding(bert(transformers))
        seeds.append(train(model, x, y, seed, 800, 1e-3, classify_loss, batch=64))
    name = "bert padded seeds" if pad else "bert seeds"
    return seed_rows(name, [seeds[:2], seeds], calib, test, root, merge)


def main() -> None:
    import transformers

    from ccamerge.runs.merge import merge

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(__file__).parent / "results" / "hf_transformers.json"
    parser.add_argument("--out", default=str(default))
    parser.add_argument(
        "--only", choices=("vit", "gpt2", "llama", "llama-gqa", "bert", "bert-padded"), default=None
    )
    args = parser.parse_args()
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "vit"):
            rows += vit_sets(transformers, Path(tmp), merge)
        if args.only in (None, "gpt2"):
            rows += gpt2_sets(transformers, Path(tmp), merge)
        if args.only in (None, "llama"):
            rows += llama_sets(transformers, Path(tmp), merge)
        if args.only in (None, "llama-gqa"):
            rows += llama_sets(transformers, Path(tmp), merge, kv_heads=2)
        if args.only in (None, "bert"):
            rows += bert_sets(transformers, Path(tmp), merge)
        if args.only in (None, "bert-padded"):
            rows += bert_sets(transformers, Path(tmp), merge, pad=True)
    total = round(time.perf_counter() - started, 1)
    result = {"rows": rows, "total_seconds": total, "transformers": transformers.__version__}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
