"""The phases of a run's restarts, read from its replay reports and shown as a table (demo and chaos).

Each restart's report (``reports/replay-*.json``, written by rank 0) holds a ``recovery`` field:
`replay.check.RecoveryPhases`. See docs/fault_tolerance.md, "What a restart reports".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich import box
from rich.table import Table

from moai_ckpt.layout import REPORTS, is_replay_report

__all__ = ["PHASES", "phases_table", "read_phases"]

#: the timed phases of a restart: (column, field of `RecoveryPhases`)
PHASES = (
    ("detection", "detection_s"),
    ("process start", "start_s"),
    ("process group", "process_group_s"),
    ("setup", "setup_s"),
    ("restore", "restore_s"),
    ("replay", "replay_s"),
    ("start to live", "total_s"),
)


def read_phases(run_dir: Path) -> list[dict[str, Any]]:
    """The phases of each restart of the run in ``run_dir``, oldest first, with the step it restored (``base``)."""
    out = []
    for path in sorted(p for p in (run_dir / REPORTS).glob("*") if is_replay_report(p.name)):
        try:
            report = json.loads(path.read_text())
        except ValueError:
            continue
        if isinstance(report, dict) and isinstance(report.get("recovery"), dict):
            out.append({"base": report.get("base_step"), **report["recovery"]})
    return out


def phases_table(phases: list[dict[str, Any]], title: str = "restart phases (replay reports, rank 0)") -> Table:
    """One row per restart: the step and tier it restored, where its time went, the steps it replayed."""
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("restored")
    for name, _ in PHASES:
        table.add_column(name, justify="right")
    table.add_column("replayed", justify="right")
    for p in phases:
        size = f", {p['restore_bytes'] / 1e6:.1f} MB" if p.get("restore_bytes") else ""
        cells = ["-" if p.get(key) is None else f"{p[key]:.2f} s" for _, key in PHASES]
        table.add_row(f"step {p.get('base')} ({p.get('restore_tier')}{size})", *cells, str(p.get("replayed_steps", 0)))
    return table
