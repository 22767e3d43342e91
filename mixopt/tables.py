"""Tables: the one way mixopt prints a table (rich, plain text: no colour, no box), so every command's
output aligns the same way and pastes into logs, docs and pull requests.

Example:
    >>> print(render_table(["domain", "count"], [["law", "12"], ["history", "3"]], right={1}))
    domain   count
    law         12
    history      3
"""

from __future__ import annotations

import io
from collections.abc import Collection, Sequence


def render_table(header: Sequence[str], rows: Sequence[Sequence[str]], right: Collection[int] = ()) -> str:
    """`rows` of already formatted cells under `header`; columns whose index is in `right` align right."""
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, show_edge=False, pad_edge=False, padding=(0, 1), header_style="", highlight=False)
    for j, name in enumerate(header):
        table.add_column(name, justify="right" if j in right else "left", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    console = Console(file=io.StringIO(), width=1000, color_system=None, force_terminal=False, highlight=False)
    console.print(table)
    text = console.file.getvalue()
    return "\n".join(line.rstrip() for line in text.splitlines())
