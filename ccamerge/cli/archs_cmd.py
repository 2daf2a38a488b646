from __future__ import annotations

import sys

from ..runtime.interrupts import quiet_interrupt_on_command_line
from .app import command
from .common import handle_errors, print_json, product_console
from .options import Json


@command("archs")
@handle_errors
def archs(
    json_out: Json = False,
) -> None:
    """List the registered architectures (and the merge methods)."""
    with quiet_interrupt_on_command_line():  # Ctrl-C while torch loads: one line
        from ..methods import list_methods
        from ..models.registry import get_architecture, list_architectures
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
    from rich.table import Table

    from ..runs.report import print_table

    t = Table(title="Architectures", title_justify="left")
    t.add_column("name")
    t.add_column("description")
    for e in entries:
        t.add_row(e["name"], e["description"])
    print_table(t, console)
    console.print(f"methods: {', '.join(list_methods())}")
