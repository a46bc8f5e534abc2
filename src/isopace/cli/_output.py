"""Terminal output: rich when the ``cli`` extra is installed, plain text otherwise."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

try:  # the cli extra
    import rich.console
    import rich.table

    HAVE_RICH = True
except ImportError:  # pragma: no cover - depends on the installed extras
    HAVE_RICH = False


class Output:
    """Prints tables and lines; colour and tables only on a terminal with rich available."""

    def __init__(self, *, plain: bool = False, stream: Any = None) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.rich = HAVE_RICH and not plain and self.stream.isatty()
        self._console: Any = (
            rich.console.Console(file=self.stream, highlight=False) if self.rich else None
        )

    def line(self, text: str = "") -> None:
        if self._console is not None:
            self._console.print(text, markup=False)
        else:
            print(text, file=self.stream, flush=True)

    def table(self, title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        if self._console is not None:
            table = rich.table.Table(title=title, title_justify="left")
            for h in headers:
                table.add_column(h)
            for row in rows:
                table.add_row(*(str(c) for c in row))
            self._console.print(table)
            return
        cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
        widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
        if title:
            self.line(title)
        for i, row in enumerate(cells):
            self.line("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
            if i == 0:
                self.line("  ".join("-" * w for w in widths))


def error(message: str) -> None:
    """One line on stderr: ``isopace: error: <message>``."""
    print(f"isopace: error: {' '.join(message.split())}", file=sys.stderr, flush=True)


def money(minor: int, currency: str = "840") -> str:
    """An amount for a table: ``currency``'s decimals, thousands grouped."""
    from isopace.iso8583 import format_amount

    return format_amount(minor, currency, grouped=True)
