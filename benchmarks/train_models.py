"""Train the benchmark models on Fashion-MNIST (fixed seeds, cached checkpoints).

    python benchmarks/train_models.py                 # everything in the default plan
    python benchmarks/train_models.py --only resnet20x1 --seeds 0 1
    python benchmarks/train_models.py --fast          # the two models the fast run needs

Checkpoints go to ``benchmarks/cache/models/{name}_s{seed}.pt`` (a plain
``torch.save(state_dict)``, loadable by ``ccamerge merge``) with a ``.json``
sidecar (recipe, wall time, test accuracy). A checkpoint that exists is not
trained again. A summary of all sidecars is written to
``benchmarks/results/training.json``.

Training data: the 50000 training-split images that are not in the calibration
set (see ``fmnist.splits``); the conv nets use a fixed random subset of it to
fit the 2-core CPU budget. Recipes (no data augmentation):

* MLP: Adam, lr 1e-3, batch 128, 5 epochs over the 50000 images
  (``ccamerge.models.train.train_classifier``).
* The conv nets (ResNet20, VGG11 and the ``cnn_zoo.py`` families): SGD, momentum 0.9,
  Nesterov, weight decay 5e-4, batch 128, one-cycle learning rate (peak 0.05 for VGG
  and ConvNeXt, 0.1 for the others), over a subset of
  ``--conv-subset`` images (default 10000) for ``--conv-epochs`` epochs (default 3).
* Split setting ("disjoint", MLP): model A sees every training image of classes
  0-4 plus 10% of those of classes 5-9; model B the reverse. Same recipe as the MLP.
  Pair s: A from initialisation seed s, B from seed s + 100 (different initialisations;
  with a shared one, plain averaging already works and every matching finds the identity).

Seeds fix the initialisation and the data order; the subset is the same for all seeds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fmnist  # noqa: E402
import models as M  # noqa: E402

from ccamerge.io.files import Dataset  # noqa: E402
from ccamerge.models.train import train_classifier  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

# name -> seeds trained by default
PLAN = {
    "mlp": [0, 1, 2, 3, 4, 5],
    "resnet20x1": [0, 1, 2, 3],
    "vgg11q": [0, 1, 2, 3],
    "resnet20x2": [0, 1, 2, 3],
    "mobilenet": [0, 1, 2, 3],
    "convnext": [0, 1, 2, 3],
    "densenet": [0, 1, 2, 3],
}
SPLIT_SEEDS = [0, 1, 2]  # mlp split pairs (A and B trained with the same seed)
FAST_PLAN = {"resnet20x1": [0, 1]}


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, bs: int = 1000) -> float:
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x[i : i + bs]).argmax(1) for i in range(0, len(x), bs)])
    return float((pred == y).float().mean())


def train_sgd(model, x, y, epochs: int, lr: float, seed: int, batch_size: int = 128):
    """SGD + Nesterov momentum 0.9, weight decay 5e-4, one-cycle schedule; seeded order."""
    gen = torch.Generator().manual_seed(seed)  # on the CPU; indices move to x's device
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.25)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch_size):
            idx = order[i : i + batch_size].to(x.device)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def save(model: torch.nn.Module, path: Path, info: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, tmp)
    tmp.replace(path)
    path.with_suffix(".json").write_text(json.dumps(info, indent=1))


def split_indices(y: np.ndarray, half: str, seed: int = 0, share: float = 0.1) -> np.ndarray:
    """Indices for split model ``half`` (A: classes 0-4, B: 5-9) plus ``share`` of the others.
    The extra share is a fixed random subset (same for all seeds)."""
    own = y < 5 if half == "A" else y >= 5
    rng = np.random.default_rng(100 + (half == "B"))
    others = np.flatnonzero(~own)
    extra = rng.choice(others, size=int(round(share * len(others))), replace=False)
    return np.sort(np.concatenate([np.flatnonzero(own), extra]))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--only", nargs="*", help="model names to train (default: the whole plan)")
    p.add_argument("--seeds", nargs="*", type=int, help="seeds (default: the plan's)")
    p.add_argument("--fast", action="store_true", help="only what run_all --fast needs")
    p.add_argument("--no-split", action="store_true", help="skip the split (disjoint) MLPs")
    p.add_argument("--conv-subset", type=int, default=10000)
    p.add_argument("--conv-epochs", type=int, default=3)
    p.add_argument("--mlp-epochs", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    dev = args.device
    torch.set_num_threads(args.threads)

    plan = dict(FAST_PLAN if args.fast else PLAN)
    if args.only:
        plan = {k: PLAN.get(k, [0, 1]) for k in args.only if k != "mlp_split"}
    if args.seeds is not None:
        plan = {k: list(args.seeds) for k in plan}
    do_split = not args.fast and not args.no_split and (not args.only or "mlp_split" in args.only)

    split_ids = fmnist.splits()["train"]
    data: dict[str, dict[str, np.ndarray]] = {}

    def get(view: str) -> dict[str, np.ndarray]:
        if view not in data:
            d = fmnist.prepare(view)
            data[view] = {
                "x": d["train_x"][split_ids],
                "y": d["train_y"][split_ids],
                "test_x": d["test_x"],
                "test_y": d["test_y"],
            }
        return data[view]

    for name, seeds in plan.items():
        for seed in seeds:
            path = M.checkpoint(name, seed)
            if path.exists():
                print(f"{path.name}: cached", flush=True)
                continue
            d = get(M.view(name))
            torch.manual_seed(seed)
            model = M.build(name).to(dev)
            t0 = time.perf_counter()
            if name == "mlp":
                x, y = torch.from_numpy(d["x"]).to(dev), torch.from_numpy(d["y"]).to(dev)
                recipe = {
                    "optimizer": "Adam",
                    "lr": 1e-3,
                    "batch_size": 128,
                    "epochs": args.mlp_epochs,
                    "train_images": len(x),
                }
                train_classifier(
                    model, Dataset(x, y), epochs=args.mlp_epochs, lr=1e-3, batch_size=128, seed=seed
                )
            else:
                sub = np.random.default_rng(7).permutation(len(d["y"]))[: args.conv_subset]
                x, y = torch.from_numpy(d["x"][sub]).to(dev), torch.from_numpy(d["y"][sub]).to(dev)
                lr = 0.05 if name.startswith(("vgg", "convnext")) else 0.1
                recipe = {
                    "optimizer": "SGD nesterov momentum 0.9 wd 5e-4 one-cycle",
                    "lr": lr,
                    "batch_size": 128,
                    "epochs": args.conv_epochs,
                    "train_images": len(x),
                }
                train_sgd(model, x, y, args.conv_epochs, lr, seed)
            wall = time.perf_counter() - t0
            acc = accuracy(
                model, torch.from_numpy(d["test_x"]).to(dev), torch.from_numpy(d["test_y"]).to(dev)
            )
            info = {
                "name": name,
                "seed": seed,
                "recipe": recipe,
                "train_seconds": wall,
                "threads": args.threads,
                "test_accuracy": acc,
            }
            save(model, path, info)
            print(f"{path.name}: test accuracy {acc:.4f}, {wall:.0f} s", flush=True)

    if do_split:
        d = get("flat")
        for seed in SPLIT_SEEDS:
            for half in "AB":
                path = M.checkpoint("mlp", seed, split=half)
                if path.exists():
                    print(f"{path.name}: cached", flush=True)
                    continue
                idx = split_indices(d["y"], half)
                x, y = torch.from_numpy(d["x"][idx]).to(dev), torch.from_numpy(d["y"][idx]).to(dev)
                init_seed = seed if half == "A" else seed + 100  # different initialisations
                torch.manual_seed(init_seed)
                model = M.build("mlp").to(dev)
                t0 = time.perf_counter()
                train_classifier(
                    model, Dataset(x, y), epochs=args.mlp_epochs, lr=1e-3, batch_size=128, seed=seed
                )
                wall = time.perf_counter() - t0
                acc = accuracy(
                    model,
                    torch.from_numpy(d["test_x"]).to(dev),
                    torch.from_numpy(d["test_y"]).to(dev),
                )
                info = {
                    "name": f"mlp_split{half}",
                    "seed": seed,
                    "init_seed": init_seed,
                    "train_seconds": wall,
                    "recipe": {
                        "optimizer": "Adam",
                        "lr": 1e-3,
                        "batch_size": 128,
                        "epochs": args.mlp_epochs,
                        "train_images": len(x),
                        "classes": "0-4 + 10% of 5-9" if half == "A" else "5-9 + 10% of 0-4",
                    },
                    "threads": args.threads,
                    "test_accuracy": acc,
                }
                save(model, path, info)
                print(f"{path.name}: test accuracy {acc:.4f}, {wall:.0f} s", flush=True)

    write_summary()


def write_summary() -> None:
    """``results/training.json``: every sidecar in the cache, and the stored rows of
    models whose checkpoints this machine does not have (trained elsewhere or earlier)."""
    RESULTS.mkdir(exist_ok=True)
    store = RESULTS / "training.json"
    rows = (
        {(r["name"], r["seed"]): r for r in json.loads(store.read_text())} if store.exists() else {}
    )
    for path in sorted(M.MODEL_DIR.glob("*.json")):
        row = json.loads(path.read_text())
        rows[row["name"], row["seed"]] = row
    store.write_text(
        json.dumps(sorted(rows.values(), key=lambda r: (r["name"], r["seed"])), indent=1)
    )


if __name__ == "__main__":
    main()
