"""``moai-ckpt stats``: a run's history in figures: its snapshots, restores and replays.

Read from the events the run's writer kept under ``events/`` (`moai_ckpt.eventlog`): at most the
newest `moai_ckpt.eventlog.MAX_EVENTS`, each read bounded.
"""

from __future__ import annotations

from typing import Any

from rich.markup import escape
from rich.table import Table

from moai_ckpt.cli.base import (
    JsonOpt,
    StorageOpt,
    UrlArg,
    command,
    echo_json,
    human_bytes,
    new_table,
    open_run,
    out,
    shown_url,
)
from moai_ckpt.cli.terminal import print_table
from moai_ckpt.eventlog import read_events, summarize

__all__ = ["stats_command"]


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} s"


def _snapshots_table(snapshots: dict[str, Any]) -> Table:
    table = new_table("snapshots")
    table.add_column("time")
    table.add_column("mean", justify="right")
    table.add_column("max", justify="right")
    table.add_row(
        "blocking (training thread)", _seconds(snapshots["blocking_mean_s"]), _seconds(snapshots["blocking_max_s"])
    )
    table.add_row(
        "persist (writing, commit)", _seconds(snapshots["persist_mean_s"]), _seconds(snapshots["persist_max_s"])
    )
    return table


def _outcome(entry: dict[str, Any]) -> str:
    return "ok" if entry["ok"] else f"[red]{escape(entry['error'] or 'failed')}[/]"


def _restores_table(restores: list[dict[str, Any]]) -> Table:
    table = new_table("restores")
    table.add_column("step", justify="right")
    table.add_column("tier")
    table.add_column("duration", justify="right")
    table.add_column("bytes", justify="right")
    table.add_column("outcome")
    for r in restores:
        table.add_row(
            str(r["step"]), escape(r["tier"]), _seconds(r["duration_s"]), human_bytes(r["bytes"]), _outcome(r)
        )
    return table


def _replays_table(replays: list[dict[str, Any]]) -> Table:
    table = new_table("replays")
    table.add_column("to step", justify="right")
    table.add_column("steps", justify="right")
    table.add_column("duration", justify="right")
    table.add_column("steps/s", justify="right")
    table.add_column("outcome")
    for r in replays:
        rate = r["steps"] / r["duration_s"] if r["duration_s"] > 0 else None
        table.add_row(
            str(r["step"]),
            str(r["steps"]),
            _seconds(r["duration_s"]),
            "-" if rate is None else f"{rate:.1f}",
            _outcome(r),
        )
    return table


@command("stats")
def stats_command(url: UrlArg, as_json: JsonOpt = False, storage_option: StorageOpt = None) -> None:
    """Summarise a run's history: its snapshots (blocking and persist times, bytes, GB/s), restores and replays.

    Snapshots, restores and replays of a run write an event each into the run directory
    (``events/``; the newest 4096 are kept). Log flushes and the events of other processes go
    to Python logging and event hooks only (see docs/observability.md).
    """
    with open_run(url, storage_option) as ckpt:
        summary = summarize(read_events(ckpt.storage))
    if as_json:
        echo_json({"url": shown_url(url), **summary})
        return
    if not summary["events"]:
        out.print(f"no events recorded in {escape(shown_url(url))}")
        return
    out.print(f"history of {escape(shown_url(url))}: {summary['events']} events", style="bold")
    snapshots = summary["snapshots"]
    rate = "-" if snapshots["gb_per_s"] is None else f"{snapshots['gb_per_s']:.3g}"
    out.print(
        f"snapshots: {snapshots['count']} ({snapshots['async']} async, {snapshots['failed']} failed), "
        f"{human_bytes(snapshots['bytes'])} written at {rate} GB/s"
    )
    print_table(_snapshots_table(snapshots))
    if summary["restores"]:
        print_table(_restores_table(summary["restores"]))
    if summary["replays"]:
        print_table(_replays_table(summary["replays"]))
