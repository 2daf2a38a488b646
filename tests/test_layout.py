"""The package's import graph has no cycle, not even through an import inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

import ccamerge

PACKAGE = Path(ccamerge.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package modules ``path`` imports, anywhere in the file (``from . import x``
    counts as importing the submodule ``x`` when there is one)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in modules else base)
    return found & modules


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports_of(p, modules) - {module_name(p)} for p in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_steps_import_only_earlier_steps_and_never_a_run():
    order = [
        "load",
        "statistics",
        "align",
        "assemble",
        "refit",
        "distill",
        "evaluate",
        "select",
        "check",
        "transforms",
        "write",
    ]
    graph = import_graph()
    for k, step in enumerate(order):
        deps = graph[f"ccamerge.pipeline.{step}"]
        later = {f"ccamerge.pipeline.{s}" for s in order[k:]} | {"ccamerge.pipeline"}
        assert not deps & later, f"{step} imports {deps & later}"
        assert not {d for d in deps if d.startswith(("ccamerge.runs", "ccamerge.cli"))}, step


MAX_PARAMETERS = 6  # of a pipeline step's or a run's function: more travel as settings objects
MAX_LINES = 120  # of any function in the package


def functions() -> list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """Every function and method of the package, with its module's name."""
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out.append((module_name(path), node))
    return out


def parameters(node: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    """The parameters a caller passes (``self``/``cls`` and ``**options`` not counted)."""
    a = node.args
    names = [p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
    return names[1:] if names[:1] in (["self"], ["cls"]) else names


def test_no_pipeline_or_run_function_takes_more_than_six_parameters():
    wide = [
        f"{module}.{node.name}: {len(parameters(node))}"
        for module, node in functions()
        if module.startswith(("ccamerge.pipeline", "ccamerge.runs"))
        and len(parameters(node)) > MAX_PARAMETERS
    ]
    assert not wide, f"more than {MAX_PARAMETERS} parameters: {wide}"


def test_no_function_is_longer_than_the_limit():
    long = [
        f"{module}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
        for module, node in functions()
        if node.end_lineno - node.lineno + 1 > MAX_LINES
    ]
    assert not long, long


def test_the_limits_see_a_wide_function():
    node = ast.parse("def f(self, a, b, /, c, *args, d, e=1, f=2, g=3, **kw): pass").body[0]
    assert parameters(node) == ["a", "b", "c", "d", "e", "f", "g"]
