"""Every run's report: one typed object per run, whose ``to_dict()`` is both the JSON
document (``--json``) and what the rich rendering on stderr reads. All rendering is here.

Tables (:func:`print_table`) are rich's boxes fitted to a terminal, and plain columns
without box-drawing characters when piped. The JSON keeps every warning as the run wrote it; the rich report of merge, apply and
barrier shows many warnings of one kind (one per layer or group, say) as one line
(:func:`group_warnings`), and all of them with ``--verbose``."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..io.files import sha256
from ..models.registry import Detected
from ..version import __version__


def describe_architecture(detected: Detected) -> dict[str, Any]:
    return {"name": detected.name, "config": detected.config}


def describe_inputs(paths: list[str]) -> list[dict[str, str]]:
    return [{"path": p, "sha256": sha256(p)} for p in paths]


class Report:
    """``to_dict()``: the fields in declaration order, the optional ones only when set."""

    OPTIONAL: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if value is not None or f.name not in self.OPTIONAL:
                out[f.name] = value
        return out


@dataclass(kw_only=True)
class MergeReport(Report):
    """``ccamerge merge`` and ``ccamerge apply`` (schema: docs/cli.md)."""

    OPTIONAL = (
        "transforms",
        "reference_choice",
        "assumptions",
        "selection",
        "refit",
        "distill",
        "check",
        "evaluation",
    )

    ccamerge_version: str = __version__
    architecture: dict[str, Any]
    assumptions: list[dict[str, str]] | None = None  # merge: what checkpoints do not record
    method: str
    params: dict[str, Any]
    aligned: dict[str, Any]  # parameters transformed by a feature-group map (align.py)
    transforms: dict[str, str] | None = None  # apply: the transforms file used
    inputs: list[dict[str, str]]
    reference: int
    reference_choice: dict[str, Any] | None = None  # merge: how the reference was chosen
    weights: list[float]
    output: str | None
    num_samples: int
    batchnorm: str
    bn_mode: str
    groups: list[dict[str, Any]]
    warnings: list[str]
    timings: dict[str, float]
    selection: dict[str, Any] | None = None
    refit: dict[str, Any] | None = None  # when the merge was refitted (pipeline.refit)
    distill: dict[str, Any] | None = None  # with --distill (pipeline.distill)
    check: dict[str, Any] | None = None  # the unlabelled check on held-out samples
    evaluation: dict[str, Any] | None = None


@dataclass(kw_only=True)
class BarrierReport(Report):
    """``ccamerge barrier`` (schema: docs/barrier.md)."""

    ccamerge_version: str = __version__
    checkpoints: list[str]
    eval_data: str
    architecture: dict[str, Any]
    assumptions: list[dict[str, str]]
    methods: dict[str, dict[str, Any]]
    steps: int
    t: list[float]
    endpoints: list[dict[str, Any]]
    ensemble: dict[str, Any]
    curves: dict[str, list[dict[str, float]]]
    barriers: dict[str, dict[str, float | None]]
    batchnorm: dict[str, str]
    num_samples: int
    eval_samples: int
    warnings: list[str]
    timings: dict[str, float]
    predicted_tokens: int | None = None  # a language model: accuracy is next-token accuracy

    OPTIONAL = ("predicted_tokens",)


def samples_scored(report: dict[str, Any]) -> str:
    """'N samples', and for a language model the next tokens they predict."""
    tokens = report.get("predicted_tokens")
    more = f", {tokens} next tokens" if tokens else ""
    return f"{report['eval_samples']} samples{more}"


# piped, a table is as wide as its rows: no cell is cut or wrapped (grep and cut see it whole)
PIPED_WIDTH = 10_000


def print_table(table: Table, console: Console) -> None:
    """Print ``table``. On a terminal: rich's box, fitted to the terminal's width (a cell
    too long for its column folds onto the next line rather than being cut). Piped (not a
    terminal): plain columns, no box-drawing characters, one line per row."""
    if console.is_terminal:
        for column in table.columns:
            column.overflow = "fold"
        console.print(table)
        return
    wide = Console(file=console.file, width=PIPED_WIDTH, highlight=False, quiet=console.quiet)
    if table.title:  # its own line: a title is not wrapped to the table's width
        wide.print(table.title)
        table.title = None
    table.box = None
    table.pad_edge = False
    wide.print(table)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def _num(v: float | None, fmt: str = ".3f") -> str:
    return "-" if v is None else format(v, fmt)


def evaluation_table(
    evaluation: dict[str, Any], title: str = "Evaluation", merged_label: str = "merged"
) -> Table:
    samples = f"{evaluation.get('num_samples', '?')} samples"
    tokens = "predicted_tokens" in evaluation  # a language model: next-token prediction
    if tokens:
        samples += f", {evaluation['predicted_tokens']} next tokens"
    t = Table(title=f"{title} ({samples})", title_justify="left")
    t.add_column("model")
    t.add_column("next-token accuracy %" if tokens else "accuracy %", justify="right")
    t.add_column("loss", justify="right")
    if tokens:
        t.add_column("perplexity", justify="right")

    def cells(r: dict[str, Any]) -> list[str]:
        out = [_pct(r["accuracy"]), _num(r["loss"], ".4f")]
        return out + [_num(r["perplexity"], ".3f")] if tokens else out

    for m in evaluation.get("models", []):
        t.add_row(str(m["path"]), *cells(m))
    if "ensemble" in evaluation:
        e = evaluation["ensemble"]
        t.add_row(f"ensemble ({e.get('kind', 'mean of logits')})", *cells(e))
    for key, label in (("average", "direct averaging"), ("merged", merged_label)):
        if key in evaluation:
            first, *rest = cells(evaluation[key])
            t.add_row(f"[bold]{label}[/]", f"[bold]{first}[/]", *rest)
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


def refit_table(refit: dict[str, Any]) -> Table:
    """Per refitted layer: the calibration residual before and after, rows and time."""
    budget = refit["memory_budget"]
    memory = "no limit known" if budget is None else f"budget {budget / 2**30:.2f} GiB"
    rows = "no row limit" if refit["max_rows"] == 0 else f"at most {refit['max_rows']} rows"
    t = Table(
        title=f"Refit ({refit['mode']} activations, {memory}; ridge {refit['ridge']:g}, "
        f"{rows} a layer; endpoints' outputs from the {refit['endpoint_outputs']}; "
        f"{refit['seconds']:.2f} s). Residual: |W x - t|^2 / |t|^2",
        title_justify="left",
    )
    for col in ("layer", "kind", "residual before", "after", "rows", "seconds"):
        t.add_column(col, justify="left" if col in ("layer", "kind") else "right")
    for layer in refit["layers"]:
        kind = layer["kind"] + (f" + {layer['norm']}" if layer["norm"] else "")
        t.add_row(
            layer["name"],
            kind,
            _num(layer["residual_before"], ".4f"),
            _num(layer["residual_after"], ".4f"),
            str(layer["samples"]),
            f"{layer['seconds']:.2f}",
        )
    return t


def check_table(check: dict[str, Any]) -> Table:
    """The merge and each input against the inputs' ensemble on the held-out samples."""
    t = Table(
        title=f"Check on {check['num_samples']} held-out calibration {check['unit']} "
        "(agreement with the inputs' ensemble; no labels used)",
        title_justify="left",
    )
    t.add_column("model")
    t.add_column("agreement %", justify="right")
    t.add_column("KL", justify="right")
    beaten = set(check["beaten_by"])
    m = check["merged"]
    t.add_row("[bold]merged[/]", f"[bold]{_pct(m['top1_agreement'])}[/]", _num(m["kl"], ".4f"))
    for m in check["inputs"]:
        mark = " [yellow](better than the merge)[/]" if m["name"] in beaten else ""
        t.add_row(f"{m['name']}{mark}", _pct(m["top1_agreement"]), _num(m["kl"], ".4f"))
    return t


def distill_line(distill: dict[str, Any]) -> str:
    """One line: what distillation trained on, for how long, and the held-out agreement."""
    first, final = distill["history"][0], distill["final"]
    work = distill["forward_equivalents"]["total"]
    return (
        f"[bold]distillation[/] {distill['epochs_run']} epochs on {distill['samples']} samples "
        f"({distill['data']}), kept epoch {distill['epoch_kept']} ({distill['stopped']}); "
        f"held-out agreement {_pct(first['agreement'])} -> {_pct(final['agreement'])} %, "
        f"{distill['seconds']:.1f} s, {work:.0f} forward-pass equivalents"
    )


# --- warnings --------------------------------------------------------------------------

# more warnings of one kind than this are one line (unless verbose)
COLLAPSE_OVER = 3
NAMES_SHOWN = 3

# a quoted string, a word (dots inside: module paths, numbers), or one other character
_TOKEN = re.compile(
    r"""(?<!\w)(?:'[^'\n]*'|"[^"\n]*"|`[^`\n]*`)(?!\w)"""  # quoted, not an apostrophe
    r"|[\w/\\-]+(?:\.[\w/\\-]+)*"
    r"|\S"
)
_SLOT = "\0"  # a token that names something, in a warning's kind
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?")


def warning_tokens(message: str) -> list[str]:
    """The message's words, quoted strings and punctuation, whitespace dropped."""
    return _TOKEN.findall(message)


def is_name(token: str) -> bool:
    """Whether a token names something rather than being prose: a quoted string, a
    number, or a word with a digit, dot, underscore or slash in it (``layer1.0.conv1``,
    ``fc2``, ``a.pt``, ``blocks_3``). A plain word (``fc``) is prose here;
    :func:`group_warnings` still groups it with the names of its kind."""
    return token[0] in "'\"`" or bool(re.search(r"[\d._/\\]", token))


def warning_kind(message: str) -> tuple[str, ...]:
    """The message with each name (:func:`is_name`) replaced by one placeholder: the
    warnings one f-string writes for different layers or groups share it."""
    return tuple(_SLOT if is_name(t) else t for t in warning_tokens(message))


def _one_name_apart(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    """Kinds that differ in one token only, a name in one and a plain word in the other
    ("layer fc keeps ..." beside "layer layer1.0 keeps ...")."""
    if len(a) != len(b):
        return False
    apart = [(x, y) for x, y in zip(a, b) if x != y]
    return len(apart) == 1 and _SLOT in apart[0]


@dataclass
class WarningGroup:
    """Warnings of one kind, in the order the run wrote them."""

    kind: tuple[str, ...]
    messages: list[str] = field(default_factory=list)

    def names(self) -> list[str]:
        """What the warnings are about, each once: the tokens at the first position where
        the messages differ (the first such position that is not only numbers, if any)."""
        columns = list(zip(*(warning_tokens(m) for m in self.messages)))
        varying = [c for c in columns if len(set(c)) > 1]
        words = [c for c in varying if not all(_NUMBER.fullmatch(t) for t in c)]
        chosen = (words or varying or [()])[0]
        return list(dict.fromkeys(t.strip("'\"`") for t in chosen))

    def summary(self) -> str:
        """The first warning, then how many there are and the first names."""
        count = len(self.messages)
        names = self.names()
        if not names:
            return f"{self.messages[0]} ({count} times; --verbose lists all)"
        listed = ", ".join(names[:NAMES_SHOWN])
        more = len(names) - NAMES_SHOWN
        tail = f" and {more} more" if more > 0 else ""
        return f"{self.messages[0]} ({count} warnings like it: {listed}{tail}; --verbose lists all)"


def group_warnings(warnings: list[str]) -> list[WarningGroup]:
    """The warnings by kind (:func:`warning_kind`), kinds in the order of their first
    warning; a kind one name apart from an earlier one (:func:`_one_name_apart`) joins it."""
    groups: list[WarningGroup] = []
    for message in warnings:
        kind = warning_kind(message)
        match = next((g for g in groups if g.kind == kind or _one_name_apart(g.kind, kind)), None)
        if match is None:
            match = WarningGroup(kind)
            groups.append(match)
        match.messages.append(message)
    return groups


def warning_lines(warnings: list[str], verbose: bool = False) -> list[str]:
    """The lines the report shows: every warning when ``verbose``; otherwise a kind of
    more than :data:`COLLAPSE_OVER` warnings is its summary line."""
    if verbose:
        return list(warnings)
    lines: list[str] = []
    for g in group_warnings(warnings):
        lines += [g.summary()] if len(g.messages) > COLLAPSE_OVER else g.messages
    return lines


def render_warnings(warnings: list[str], console: Console, verbose: bool = True) -> None:
    """One ``warning:`` line each (:func:`warning_lines`), never wrapped (one line also
    when piped, for grep); their text is not markup."""
    for line in warning_lines(warnings, verbose):
        console.print(f"[yellow]warning:[/] {escape(line)}", soft_wrap=True)


def render_assumptions(report: dict[str, Any], console: Console) -> None:
    """One line per setting the checkpoints do not record: its value and its source."""
    for a in report.get("assumptions", []):
        console.print(f"[bold]{a['setting']}[/] {a['value']} ({a['source']})")


def aligned_line(aligned: dict[str, Any]) -> str:
    """``aligned 96.1 % of the parameters (12,345 of 12,846); kept averaged: ...``."""
    line = (
        f"[bold]aligned[/] {aligned['fraction']:.1%} of the parameters "
        f"({aligned['parameters']:,} of {aligned['total']:,})"
    )
    kept = list(aligned["kept_averaged"].items())
    if kept:
        line += "; kept averaged: " + ", ".join(f"{k} {n:,}" for k, n in kept[:4])
    return line


def _setting(value: Any) -> str:
    """A configuration value on one line: a nested mapping (a Hugging Face config.json) by
    its size; the JSON report has it whole."""
    return f"{{{len(value)} settings}}" if isinstance(value, dict) else str(value)


def render_merge_report(report: dict[str, Any], console: Console, verbose: bool = False) -> None:
    """The merge (or apply) report on stderr; ``verbose``: every warning listed."""
    arch = report["architecture"]
    cfg = ", ".join(f"{k}={_setting(v)}" for k, v in arch["config"].items())
    params = ", ".join(f"{k}={v}" for k, v in report["params"].items()) or "-"
    console.print(f"[bold]architecture[/] {arch['name']} ({cfg})")
    console.print(aligned_line(report["aligned"]))
    render_assumptions(report, console)
    plain = " plain averaging" if report["method"] == "average" else ""
    console.print(f"[bold]method[/] {report['method']} ({params}){plain}")
    for k, inp in enumerate(report["inputs"]):
        tag = " \\[reference]" if k == report["reference"] else ""
        console.print(f"  model {k}: {inp['path']}  weight {report['weights'][k]:.3f}{tag}")
    choice = report.get("reference_choice") or {}
    if choice.get("rule") == "best":
        console.print(f"[bold]reference[/] model {report['reference']} (best by {choice['by']})")
    used = report["num_samples"] or "none used (nothing to align or refit)"
    console.print(f"[bold]calibration samples[/] {used}")
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
    if report["groups"]:
        print_table(groups, console)
    if "selection" in report:
        print_table(selection_table(report["selection"]), console)
    if "refit" in report:
        print_table(refit_table(report["refit"]), console)
    if "distill" in report:
        console.print(distill_line(report["distill"]))
    if "check" in report:
        print_table(check_table(report["check"]), console)

    if "evaluation" in report:
        merged_label = f"merged ({report['method']})"
        print_table(evaluation_table(report["evaluation"], merged_label=merged_label), console)

    timings = Table(title="Timings", title_justify="left")
    timings.add_column("phase")
    timings.add_column("seconds", justify="right")
    for phase, sec in report["timings"].items():
        timings.add_row(phase, f"{sec:.2f}")
    print_table(timings, console)
    render_warnings(report.get("warnings", []), console, verbose)
    if report.get("output"):
        console.print(f"[green]wrote[/] {report['output']}")
    else:
        console.print("[yellow]no --output given: the merged model was not written[/]")


def render_barrier_report(
    report: dict[str, Any],
    plot: Path | None,
    csv_out: Path | None,
    console: Console,
    verbose: bool = False,
) -> None:
    """The curve table (t by method) and the barrier summary, on stderr; ``verbose``:
    every warning listed."""
    a, b = report["endpoints"]
    console.print(f"[bold]architecture[/] {report['architecture']['name']}")
    render_assumptions(report, console)
    console.print(
        f"  A (t = 0): {a['path']}  accuracy {100 * a['accuracy']:.2f} %  loss {a['loss']:.4f}"
    )
    console.print(
        f"  B (t = 1): {b['path']}  accuracy {100 * b['accuracy']:.2f} %  loss {b['loss']:.4f}"
    )
    e = report["ensemble"]
    console.print(
        f"  ensemble of A and B (mean of logits): accuracy {100 * e['accuracy']:.2f} %  loss {e['loss']:.4f}"
    )
    names = list(report["curves"])
    curve = Table(
        title=f"Accuracy % / loss along the path ({samples_scored(report)})",
        title_justify="left",
    )
    curve.add_column("t", justify="right")
    for name in names:
        curve.add_column(name, justify="right")
    for i, t in enumerate(report["t"]):
        row = [f"{t:.2f}"]
        for name in names:
            p = report["curves"][name][i]
            row.append(f"{100 * p['accuracy']:6.2f} / {p['loss']:.4f}")
        curve.add_row(*row)
    print_table(curve, console)

    summary = Table(title="Barriers (worst gap to the straight line, at t)", title_justify="left")
    for col in ("method", "loss", "accuracy pts", "acc. % at 1/2", "loss at 1/2"):
        summary.add_column(col, justify="left" if col == "method" else "right")
    for name in names:
        r = report["barriers"][name]
        summary.add_row(
            name,
            f"{r['loss']:.4f} @{r['loss_t']:.2f}",
            f"{100 * r['accuracy']:.2f} @{r['accuracy_t']:.2f}",
            "-" if r["accuracy_mid"] is None else f"{100 * r['accuracy_mid']:.2f}",
            "-" if r["loss_mid"] is None else f"{r['loss_mid']:.4f}",
        )
    print_table(summary, console)
    for name, done in report["batchnorm"].items():
        if not done.startswith("none"):
            console.print(f"[bold]BatchNorm[/] ({name}, 0 < t < 1): {done}")
    console.print("endpoints (t = 0, 1) are the checkpoints themselves, not re-merged")
    render_warnings(report["warnings"], console, verbose)
    for what, path in (("plot", plot), ("curve CSV", csv_out)):
        if path is not None:
            console.print(f"[green]wrote[/] {what} {path}")


def render_inspection(
    info: dict[str, Any], console: Console, verbose: bool = False, shown: int = 4
) -> None:
    """``inspect``'s report; a group's first ``shown`` member tensors and a count of the
    rest (``verbose``: all of them)."""
    arch = info["architecture"]
    cfg = ", ".join(f"{k}={_setting(v)}" for k, v in arch["config"].items())
    console.print(f"[bold]{info['path']}[/]")
    console.print(f"[bold]architecture[/] {arch['name']} ({cfg})")
    render_assumptions(info, console)
    shape = info["input_shape"]
    console.print(
        f"[bold]input[/] {'-' if shape is None else ' x '.join(map(str, shape))} per sample"
    )
    console.print(
        f"[bold]parameters[/] {info['num_parameters']:,}  (+ {info['num_buffer_values']:,} "
        f"buffer values, {info['num_tensors']} tensors)"
    )
    t = Table(title=f"Feature groups ({len(info['groups'])})", title_justify="left")
    t.add_column("group")
    t.add_column("size", justify="right")
    maps = any(g["maps"] != "dense" for g in info["groups"])  # the column when it says more
    if maps:
        t.add_column("maps")
    t.add_column("collected at")
    t.add_column("members (tensor:axis)")
    for g in info["groups"]:
        names = [f"{m['tensor']}:{m['axis']}" for m in g["members"]]
        rest = 0 if verbose else max(len(names) - shown, 0)
        members = " ".join(names[: len(names) - rest]) + (f" ... {rest} more" if rest else "")
        t.add_row(
            g["name"],
            str(g["size"]),
            *([g["maps"]] if maps else []),
            f"{g['collect_on']} of {g['collect_at']}"
            + (" (units last)" if g.get("collect_axis") == -1 else ""),
            members,
        )
    print_table(t, console)
    copies = [f"{c['name']} ({c['group']} x {c['copies']})" for c in info.get("copies", [])]
    folds = [f"{f['norm']} -> {' '.join(f['readers'])}" for f in info.get("folds", [])]
    for title, items in (("head copies", copies), ("norms folded into their readers", folds)):
        if items:
            listed = items if verbose else items[:shown]
            more = f" ... {len(items) - len(listed)} more" if len(listed) < len(items) else ""
            console.print(f"[bold]{title}[/] ({len(items)}): {', '.join(listed)}{more}")
    if info["ungrouped"]:
        console.print(f"[bold]not transformed[/] (only averaged): {', '.join(info['ungrouped'])}")
    for u in info.get("untransformed", []):
        why = "; ".join(u["reasons"])
        console.print(f"[bold]untransformed units[/] of {', '.join(u['writers'])}: {why}")
    render_warnings(info.get("warnings", []), console)
