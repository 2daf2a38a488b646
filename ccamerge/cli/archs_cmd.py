from __future__ import annotations

import sys

from rich.table import Table

from ..methods import list_methods
from ..models.registry import get_architecture, list_architectures
from .app import app
from .common import handle_errors, print_json, product_console
from .options import Json


@app.command("archs")
@handle_errors
def archs(
    json_out: Json = False,
) -> None:
    """List the registered architectures (and the merge methods)."""
    entries = [
        {"name": n, "description": getattr(get_architecture(n), "description", "")}
        for n in list_architectures()
    ]
    if json_out:
        print_json({"architectures": entries, "methods": list_methods()})
        return
    console = product_console()
    if not console.is_terminal:  # piped: one line per architecture, for grep and cut
        lines = [f"{e['name']}\t{e['description']}" for e in entries]
        sys.stdout.write("\n".join([*lines, f"methods: {', '.join(list_methods())}"]) + "\n")
        return
    t = Table(title="Architectures", title_justify="left")
    t.add_column("name")
    t.add_column("description")
    for e in entries:
        t.add_row(e["name"], e["description"])
    console.print(t)
    console.print(f"methods: {', '.join(list_methods())}")
