"""Rich rendering of reports (always to the stderr console)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def _num(v: float | None, fmt: str = ".3f") -> str:
    return "-" if v is None else format(v, fmt)


def evaluation_table(
    evaluation: dict[str, Any], title: str = "Evaluation", merged_label: str = "merged"
) -> Table:
    t = Table(title=f"{title} ({evaluation.get('num_samples', '?')} samples)", title_justify="left")
    t.add_column("model")
    t.add_column("accuracy %", justify="right")
    t.add_column("loss", justify="right")
    for m in evaluation.get("models", []):
        t.add_row(str(m["path"]), _pct(m["accuracy"]), _num(m["loss"], ".4f"))
    if "ensemble" in evaluation:
        e = evaluation["ensemble"]
        t.add_row(
            f"ensemble ({e.get('kind', 'mean of logits')})",
            _pct(e["accuracy"]),
            _num(e["loss"], ".4f"),
        )
    for key, label in (("average", "direct averaging"), ("merged", merged_label)):
        if key in evaluation:
            r = evaluation[key]
            t.add_row(
                f"[bold]{label}[/]", f"[bold]{_pct(r['accuracy'])}[/]", _num(r["loss"], ".4f")
            )
    return t


def selection_table(selection: dict[str, Any]) -> Table:
    """Every candidate of --gamma auto / --method auto, the winner marked."""
    by = selection["select_by"]
    t = Table(
        title=f"Selection on {selection['heldout_samples']} held-out calibration samples "
        f"(by {'KL divergence to the ensemble' if by == 'agreement' else 'cross-entropy'}, "
        "lower is better)",
        title_justify="left",
    )
    t.add_column("candidate")
    t.add_column("score", justify="right")
    t.add_column("top-1 agreement %", justify="right")
    for c in selection["candidates"]:
        win = c["candidate"] == selection["winner"]
        name = f"[bold]{c['candidate']} *[/]" if win else c["candidate"]
        t.add_row(name, f"{c['score']:.4g}", _pct(c["top1_agreement"]))
    return t


def render_merge_report(report: dict[str, Any], console: Console) -> None:
    arch = report["architecture"]
    cfg = ", ".join(f"{k}={v}" for k, v in arch["config"].items())
    params = ", ".join(f"{k}={v}" for k, v in report["params"].items()) or "-"
    console.print(f"[bold]architecture[/] {arch['name']} ({cfg})")
    console.print(f"[bold]method[/] {report['method']} ({params})")
    for k, inp in enumerate(report["inputs"]):
        tag = " \\[reference]" if k == report["reference"] else ""
        console.print(f"  model {k}: {inp['path']}  weight {report['weights'][k]:.3f}{tag}")
    choice = report.get("reference_choice") or {}
    if choice.get("rule") == "best":
        console.print(f"[bold]reference[/] model {report['reference']} (best by {choice['by']})")
    console.print(f"[bold]calibration samples[/] {report['num_samples']}")
    console.print(f"[bold]BatchNorm[/] {report['batchnorm']}")

    groups = Table(title="Feature groups", title_justify="left")
    groups.add_column("group")
    groups.add_column("size", justify="right")
    groups.add_column("mean corr", justify="right")
    groups.add_column("min corr", justify="right")
    groups.add_column("cond", justify="right")
    per_model = len(report["inputs"]) > 2
    if per_model:
        groups.add_column("per model", justify="left")
    for g in report["groups"]:
        row = [
            g["name"],
            str(g["size"]),
            _num(g["mean_correlation"]),
            _num(g["min_correlation"]),
            _num(g["condition_number"], ".2e"),
        ]
        if per_model:
            row.append(" ".join("ref" if q is None else f"{q:.2f}" for q in g["per_model"]))
        groups.add_row(*row)
    console.print(groups)
    if "selection" in report:
        console.print(selection_table(report["selection"]))

    if "evaluation" in report:
        console.print(
            evaluation_table(report["evaluation"], merged_label=f"merged ({report['method']})")
        )

    timings = Table(title="Timings", title_justify="left")
    timings.add_column("phase")
    timings.add_column("seconds", justify="right")
    for phase, sec in report["timings"].items():
        timings.add_row(phase, f"{sec:.2f}")
    console.print(timings)
    for w in report.get("warnings", []):
        console.print(f"[yellow]warning:[/] {w}")
    if report.get("output"):
        console.print(f"[green]wrote[/] {report['output']}")
    else:
        console.print("[yellow]no --output given: the merged model was not written[/]")
