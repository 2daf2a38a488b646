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

import torch
import torch.nn.functional as F
import vit_models
from hf_transformers import METHODS, result_row, vit_data, vit_seeds

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
    data = vit_data(root)
    seeds = vit_seeds(getattr(vit_models, FACTORIES[family]), data, classify_loss)
    runs = [{"method": m} for m in METHODS] + [{"refit": False}]
    runs.append({"distill": "auto", "distill_data": str(data.unlabelled)})
    return [
        run_set(family, models, data.calib, data.test, root, merge, **options)
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
