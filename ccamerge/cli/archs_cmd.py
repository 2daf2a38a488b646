from __future__ import annotations

from rich.table import Table

from ..methods import list_methods
from ..registry import get_architecture, list_architectures
from .app import app
from .common import console, handle_errors, print_json
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
    t = Table(title="Architectures", title_justify="left")
    t.add_column("name")
    t.add_column("description")
    for e in entries:
        t.add_row(e["name"], e["description"])
    console.print(t)
    console.print(f"methods: {', '.join(list_methods())}")
