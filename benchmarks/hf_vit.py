"""A Hugging Face ViT (``transformers``, built from a config) on Fashion-MNIST, merged from
folders without ``--model`` (docs/benchmarks.md, "Hugging Face folders").

Two situations a user meets:

* **fine-tunes**: one model trained from scratch (the "pretrained" base), then two
  copies fine-tuned on disjoint halves of further training data with different seeds;
* **seeds**: two models trained from scratch with different seeds.

Each pair is written with ``save_pretrained``, merged with ccamerge's defaults (the check
on, ``-o DIR/``), and the merged folder is loaded back with ``from_pretrained`` and scored
on the 10000 test images beside the inputs and their ensemble. torch.fx cannot trace
transformers' ViT, so nothing is aligned: the merge is a plain average, and the numbers
show where that is enough; each pair is merged again with ``--distill auto`` on 10000
unlabelled training images (``--distill-data``). One thread; a few minutes.

    python benchmarks/hf_vit.py [--out benchmarks/results/hf_vit.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from fmnist import prepare, splits

torch.set_num_threads(1)


def vit(transformers):
    config = transformers.ViTConfig(
        image_size=28, patch_size=7, num_channels=1, hidden_size=64, num_hidden_layers=3,
        num_attention_heads=4, intermediate_size=128, num_labels=10,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return transformers.ViTForImageClassification(config)


def train(model, x, y, seed: int, epochs: int, lr: float):
    """AdamW with a cosine schedule, batch 128."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * (len(x) // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for k in range(len(x) // 128):
            idx = order[k * 128 : (k + 1) * 128]
            loss = F.cross_entropy(model(x[idx]).logits, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def logits(model, x):
    return torch.cat([model(x[k : k + 1000]).logits for k in range(0, len(x), 1000)])


def accuracy(lg, y) -> float:
    return round(100 * float((lg.argmax(1) == y).float().mean()), 2)


def run_pair(name, models, calib, test, root: Path, merge, **options):
    folders = []
    for k, m in enumerate(models):
        folders.append(str(root / f"{name}{k}"))
        m.save_pretrained(folders[-1])
    out = root / f"{name}-merged"
    start = time.perf_counter()
    result = merge(folders, data=str(calib), output=f"{out}/", force=True, **options)
    seconds = time.perf_counter() - start
    import transformers

    merged = transformers.ViTForImageClassification.from_pretrained(str(out)).eval()
    x, y = test
    ins = [logits(m.eval(), x) for m in models]
    report = result.report
    check = report.get("check", {})
    distill = report.get("distill")
    return {
        "pair": name,
        "options": {k: Path(v).name if k.endswith("_data") else v for k, v in options.items()},
        "distill_epochs": None
        if distill is None
        else [distill["epochs_run"], distill["epoch_kept"]],
        "inputs": [accuracy(lg, y) for lg in ins],
        "ensemble": accuracy(sum(ins) / len(ins), y),
        "merged": accuracy(logits(merged, x), y),
        "method": report["method"],
        "aligned_fraction": report["aligned"]["fraction"],
        "check_beaten_by": len(check.get("beaten_by", [])),
        "merge_seconds": round(seconds, 1),
    }


def main() -> None:
    import transformers

    from ccamerge.runs.merge import merge

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "hf_vit.json"))
    args = parser.parse_args()

    data = prepare("flat")
    split = splits()
    images = torch.as_tensor(data["train_x"]).reshape(-1, 1, 28, 28)
    labels = torch.as_tensor(data["train_y"])
    train_idx = torch.as_tensor(split["train"])
    base_idx, rest = train_idx[:20000], train_idx[20000:]
    halves = rest[: len(rest) // 2], rest[len(rest) // 2 :]
    calib_idx = torch.as_tensor(split["calib"][:2000])
    test = torch.as_tensor(data["test_x"]).reshape(-1, 1, 28, 28), torch.as_tensor(data["test_y"])

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        calib = root / "calib.npz"
        np.savez(calib, x=images[calib_idx].numpy(), y=labels[calib_idx].numpy())
        started = time.perf_counter()
        torch.manual_seed(0)
        base = train(vit(transformers), images[base_idx], labels[base_idx], 0, 2, 2e-3)
        tunes = []
        for k, half in enumerate(halves):
            tune = vit(transformers)
            tune.load_state_dict(base.state_dict())
            tunes.append(train(tune, images[half], labels[half], 10 + k, 1, 5e-4))
        rows.append(run_pair("fine-tunes", tunes, calib, test, root, merge))
        seeds = []
        for seed in (1, 2):
            torch.manual_seed(seed)
            seeds.append(
                train(vit(transformers), images[base_idx], labels[base_idx], seed, 2, 2e-3)
            )
        rows.append(run_pair("seeds", seeds, calib, test, root, merge))
        unlabelled = root / "unlabelled.npy"  # 10000 training images, no labels
        np.save(unlabelled, images[rest[:10000]].numpy())
        for pair, models in (("fine-tunes", tunes), ("seeds", seeds)):
            options = {"distill": "auto", "distill_data": str(unlabelled)}
            rows.append(run_pair(pair, models, calib, test, root, merge, **options))
        total = round(time.perf_counter() - started, 1)
    result = {"rows": rows, "total_seconds": total, "transformers": transformers.__version__}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
