"""Fitting output to the terminal: tables that drop columns rather than cut figures, progress bars.

A figure cut to ``"280.4 …"`` is worse than no figure: `print_table` renders a table at the
terminal's width and, while any cell would be cut, leaves out a column (the ones named in
``drop`` first, then from the right; never the first), and says on stderr which ones it left out
(``--json`` has them all). Columns of text wrap, and fold a word longer than the column.

`progress` is the one progress bar of every long operation (verify, restore, replay, export,
import): bytes or steps done, the rate and the time left, on stderr, so ``--json`` output on
stdout stays parseable. It shows on a terminal, or when ``--progress`` asks for it.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from moai_ckpt.checkpointer import Checkpointer
from moai_ckpt.cli.base import err, out
from moai_ckpt.dtypes import from_name
from moai_ckpt.errors import MoaiCkptError

__all__ = ["CUT", "ProgressOpt", "bytes_progress", "fit_table", "print_table", "progress", "snapshot_bytes"]

#: what rich prints where it cuts a cell
CUT = "…"

ProgressOpt = Annotated[
    bool | None,
    typer.Option(
        "--progress/--no-progress",
        help="Show a progress bar on stderr (default: only on a terminal).",
        show_default=False,
    ),
]


def _plain(cell: object) -> str:
    if isinstance(cell, Text):
        return cell.plain
    return Text.from_markup(cell).plain if isinstance(cell, str) else ""


def _render(table: Table, width: int) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None, highlight=False, legacy_windows=False)
    console.print(table)
    return console.file.getvalue()  # type: ignore[attr-defined]


def _cut_at(table: Table, width: int, folded: set[int]) -> bool:
    """Whether ``table`` rendered ``width`` wide cuts a cell, or breaks a word of a cell.

    ``folded``: ids of the columns whose words may break across lines (their caller chose ``fold``).
    Words longer than half the width may break in any column.
    """
    rendered = _render(table, width)
    if CUT in rendered:
        return True
    longest = width // 2  # a longer word (a path, a URL) folds wherever it is: leaving columns out would not save it
    for column in table.columns:
        if id(column) in folded:
            continue
        words = (word for cell in column.cells for word in _plain(cell).split())
        if any(word not in rendered for word in words if len(word) <= longest):
            return True
    return False


def _prepare(table: Table) -> set[int]:
    """Figures (right-justified) stay on one line, cut with an ellipsis where they do not fit, so
    `fit_table` sees it; other text wraps, and folds a long word (which `fit_table` sees too);
    a column whose caller chose to fold keeps that. Returns the ids of those columns."""
    folded = set()
    for column in table.columns:
        if column.overflow == "fold":  # the caller's choice: break anywhere, rather than leave it out
            folded.add(id(column))
            column.no_wrap = False
        elif column.justify == "right":  # a figure
            column.no_wrap, column.overflow = True, "ellipsis"
        elif not column.no_wrap:
            column.overflow = "fold"
    return folded


def fit_table(table: Table, width: int, drop: Iterable[str] = ()) -> list[str]:
    """Leave out columns of ``table`` until it renders ``width`` wide without a cut cell.

    Args:
        table: the table (changed in place).
        width: the width to fit.
        drop: the headers of the columns to leave out first, in order; then the others, from
            the right. The first column is never left out.

    Returns:
        The headers of the columns left out, in the order they were.
    """
    folded = _prepare(table)
    order = [str(name) for name in drop]
    dropped: list[str] = []
    while len(table.columns) > 1 and _cut_at(table, width, folded):
        headers = [str(c.header) for c in table.columns]
        wanted = next((name for name in order if name in headers[1:]), None)
        index = headers.index(wanted) if wanted is not None else len(headers) - 1
        dropped.append(headers[index])
        table.columns.pop(index)
        for i, column in enumerate(table.columns):
            column._index = i  # rich pads the first and last columns by their index
    return dropped


def print_table(table: Table, drop: Iterable[str] = (), console: Console | None = None) -> None:
    """Print ``table`` on stdout, fitted to the terminal (`fit_table`); says on stderr what was left out."""
    console = console or out
    dropped = fit_table(table, console.width, drop)
    console.print(table)
    if dropped:
        err.print(
            f"left out at {console.width} columns: {', '.join(dropped)} (widen the terminal, or use --json)",
            style="dim",
        )


def progress(unit: str = "bytes", *, show: bool | None = None) -> Progress:
    """A progress bar on stderr with the rate and the time left, gone when done.

    Args:
        unit: ``"bytes"`` (sizes and a transfer speed) or ``"steps"`` (a count and steps per second).
        show: ``--progress``: True shows it even off a terminal, False never; None on a terminal only.
    """
    columns: list[ProgressColumn | str] = [TextColumn("{task.description}"), BarColumn()]
    if unit == "bytes":
        columns += [DownloadColumn(binary_units=True), TransferSpeedColumn()]
    else:
        columns += [MofNCompleteColumn(), TaskProgressColumn(), _StepRate()]
    columns += [TimeElapsedColumn(), TimeRemainingColumn()]
    visible = err.is_terminal if show is None else show
    return Progress(*columns, console=err, transient=err.is_terminal, disable=not visible)


class _StepRate(ProgressColumn):
    """Steps per second, as rich measures it."""

    def render(self, task: Task) -> Text:
        return Text(f"{task.speed:.1f} steps/s" if task.speed else "- steps/s", style="progress.data.speed")


@contextmanager
def bytes_progress(description: str, total: int | None, show: bool | None) -> Iterator[Callable[[int], None]]:
    """A bytes `progress` bar with one task; yields the callable that advances it (a `moai_ckpt.snapshot.Progress`)."""
    with progress("bytes", show=show) as bar:
        task = bar.add_task(description, total=total)
        yield functools.partial(bar.advance, task)


def snapshot_bytes(ckpt: Checkpointer, step: int | None, keys: Iterable[str] | None = None) -> int | None:
    """Tensor bytes of the snapshot at ``step`` (of its entries ``keys``), for a bar's total; None if unknown."""
    try:
        arrays = ckpt.manifest(step).arrays.values()
    except MoaiCkptError:  # the command itself reports it
        return None
    chosen = None if keys is None else tuple(f"{key}/" for key in keys)
    total = 0
    for record in arrays:
        if chosen is not None and not record.path.startswith(chosen):
            continue
        try:
            total += math.prod(record.shape) * from_name(record.dtype).itemsize
        except ValueError:  # a dtype this version does not know
            return None
    return total
