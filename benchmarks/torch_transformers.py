"""Vision transformers under ``--model`` (docs/benchmarks.md, "Transformers under
--model"): the ViTs of benchmarks/vit_models.py (torch.nn's ``TransformerEncoder``, and
timm's ``VisionTransformer`` where timm is installed) trained from scratch on
Fashion-MNIST as the Hugging Face ViT of hf_transformers.py is (four seeds, two epochs of
20000 images, AdamW one-cycle 2e-3), saved as state dicts and merged N = 2 and N = 4 with
every method with the refit, the default without it, and the default with ``--distill
auto`` (10000 unlabelled training images). Test accuracy on the 10000 test images of the
inputs, their ensemble and the merge. One thread.

    python benchmarks/torch_transformers.py [--only torch|timm] [--out FILE]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import vit_models
from fmnist import prepare, splits
from hf_transformers import METHODS, result_row, train

torch.set_num_threads(1)
FACTORIES = {"torch": "torch_vit", "timm": "timm_vit"}


def classify_loss(model, x, y):
    return F.cross_entropy(model(x), y)


@torch.no_grad()
def logits(model, x):
    return torch.cat([model(x[k : k + 500]) for k in range(0, len(x), 500)])


def run_set(family, models, calib, test, root: Path, merge, **options) -> dict:
    name = f"{family} n{len(models)}"
    paths = []
    for k, m in enumerate(models):
        paths.append(str(root / f"{family}-{k}.pt"))
        if not Path(paths[-1]).exists():
            torch.save(m.state_dict(), paths[-1])
    factory = f"{Path(vit_models.__file__).resolve()}:{FACTORIES[family]}"
    start = time.perf_counter()
    result = merge(paths, model=factory, data=str(calib), **options)
    seconds = time.perf_counter() - start
    x, y = test
    ins = [logits(m.eval(), x) for m in models]
    merged = logits(result.model.float().eval(), x)
    row = result_row(name, options, result.report, seconds, ins, merged, y)
    return {**row, "groups": len(result.report["groups"])}


def family_rows(family: str, root: Path, merge) -> list[dict]:
    data = prepare("flat")
    split = splits()
    images = torch.as_tensor(data["train_x"]).reshape(-1, 1, 28, 28)
    labels = torch.as_tensor(data["train_y"])
    train_idx = torch.as_tensor(split["train"])
    base_idx, rest = train_idx[:20000], train_idx[20000:]
    calib = root / "calib.npz"
    calib_idx = torch.as_tensor(split["calib"][:2000])
    np.savez(calib, x=images[calib_idx].numpy(), y=labels[calib_idx].numpy())
    test = torch.as_tensor(data["test_x"]).reshape(-1, 1, 28, 28), torch.as_tensor(data["test_y"])
    unlabelled = root / "unlabelled.npy"
    np.save(unlabelled, images[rest[:10000]].numpy())
    steps = 2 * len(base_idx) // 128
    build = getattr(vit_models, FACTORIES[family])
    seeds = []
    for seed in (1, 2, 3, 4):
        torch.manual_seed(seed)
        model = build()
        seeds.append(
            train(model, images[base_idx], labels[base_idx], seed, steps, 2e-3, classify_loss)
        )
    runs = [{"method": m} for m in METHODS] + [{"refit": False}]
    runs.append({"distill": "auto", "distill_data": str(unlabelled)})
    return [
        run_set(family, models, calib, test, root, merge, **options)
        for models in (seeds[:2], seeds)
        for options in runs
    ]


def main() -> None:
    from ccamerge.runs.merge import merge

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=tuple(FACTORIES), default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    families = [args.only] if args.only else list(FACTORIES)
    if "timm" in families and importlib.util.find_spec("timm") is None:
        if args.only == "timm":
            raise SystemExit("timm is not installed: see benchmarks/README.md")
        families.remove("timm")
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in families:
            rows += family_rows(family, Path(tmp), merge)
    result = {"rows": rows, "total_seconds": round(time.perf_counter() - started, 1)}
    result["torch"] = torch.__version__
    if "timm" in families:
        import timm

        result["timm"] = timm.__version__
    suffix = f"_{args.only}" if args.only else ""
    default = Path(__file__).parent / "results" / f"torch_transformers{suffix}.json"
    out = Path(args.out or default)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
