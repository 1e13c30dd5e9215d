"""How the ``ferry`` CLI shows things: rich tables on a terminal, plain text elsewhere, JSON on request.

On a terminal, tables are drawn with rich and ``status --watch`` is a live
display.  When stdout is not a terminal (a pipe, a file, a test), the same
tables are plain aligned columns with a header row, stable for scripts;
``--json`` prints the server's answer as it came.  ``FORCE_COLOR=1`` (or
``TTY_COMPATIBLE=1``) makes rich draw even when stdout is not a terminal.
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table as RichTable
from rich.text import Text


class Bar(NamedTuple):
    """A progress cell: the fraction done, or None when unknown."""

    fraction: float | None
    width: int = 20

    def __str__(self) -> str:
        if self.fraction is None:
            return " " * (self.width + 2)
        full = int(min(max(self.fraction, 0.0), 1.0) * self.width)
        return "[" + "#" * full + "." * (self.width - full) + "]"


class Table(NamedTuple):
    """Rows under a header, shown as a rich table or as plain columns."""

    columns: Sequence[str]
    rows: Sequence[Sequence[Any]]
    title: str | None = None


Part = str | Table
"""What a command shows: lines of text and tables, in order."""


@functools.cache
def console() -> Console:
    """The console on stdout (tables, live displays)."""
    return Console(highlight=False)


@functools.cache
def error_console() -> Console:
    """The console on stderr (spinners while a long command waits)."""
    return Console(stderr=True, highlight=False)


def plain(table: Table) -> str:
    """``table`` as aligned columns, a header row first (cells are ``str()``-ed)."""
    rows = [list(table.columns), *[[str(c) for c in r] for r in table.rows]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(table.columns))]
    text = "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )
    return f"{table.title}\n{text}" if table.title else text


def drawn(table: Table) -> RichTable:
    """``table`` as a rich table (progress cells as bars)."""
    out = RichTable(title=table.title, box=box.SIMPLE_HEAD, title_justify="left")
    for column in table.columns:
        out.add_column(column, no_wrap=column != "MESSAGE")
    for row in table.rows:
        out.add_row(*(_cell(c) for c in row))
    return out


def _cell(value: Any) -> RenderableType:
    if isinstance(value, Bar):
        if value.fraction is None:
            return Text("-")
        done = min(max(value.fraction, 0.0), 1.0)
        return ProgressBar(total=1.0, completed=done, width=value.width)
    return Text(str(value))


def renderable(parts: Sequence[Part]) -> RenderableType:
    """``parts`` as one rich renderable."""
    return Group(*(drawn(p) if isinstance(p, Table) else Text(p) for p in parts))


def text(parts: Sequence[Part]) -> str:
    """``parts`` as plain text, a blank line between tables."""
    return "\n\n".join(plain(p) if isinstance(p, Table) else p for p in parts)


def show(as_json: bool, value: Any, *parts: Part) -> None:
    """Print ``value`` as JSON if asked, else ``parts`` (drawn on a terminal, plain elsewhere)."""
    if as_json:
        print(json.dumps(value, indent=1))
    elif console().is_terminal:
        console().print(renderable(parts))
    else:
        print(text(parts), flush=True)


def watch(fetch: Callable[[], Sequence[Part]], interval: float, title: str) -> None:
    """Redraw ``fetch()`` every ``interval`` seconds until Ctrl-C.

    On a terminal it is a rich live display; elsewhere each poll prints a
    time-stamped plain snapshot (no escape codes).
    """
    out = console()
    if not out.is_terminal:
        while True:
            print(f"{time.strftime('%H:%M:%S')} {title}\n{text(fetch())}\n", flush=True)
            time.sleep(interval)
    with Live(console=out, auto_refresh=False, screen=False) as live:
        while True:
            heading = f"{time.strftime('%H:%M:%S')} {title} (Ctrl-C to stop)"
            live.update(renderable([heading, *fetch()]), refresh=True)
            time.sleep(interval)


@contextlib.contextmanager
def busy(message: str) -> Iterator[None]:
    """A spinner on stderr while a long call waits (nothing when stderr is not a terminal)."""
    err = error_console()
    if not err.is_terminal:
        yield
        return
    with err.status(message):
        yield
