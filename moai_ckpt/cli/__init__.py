"""The ``moai-ckpt`` command line: every command, registered on one Typer app in the order ``--help`` lists.

- `base`: the app, its consoles, shared options and helpers;
- `snapshots`: ``list``, ``inspect``, ``verify``, ``prune``;
- `interop`: ``export``, ``import-dcp``, ``export-dcp``;
- `restore`: ``restore``, ``replay`` (with `sessions` and `code`: running a training function offline);
- `ops`: ``capture``, ``diff-ops`` (and ``replay --ops``);
- `plan`: ``plan``;
- `stats`: ``stats`` (a run's history of events);
- `terminal`: tables fitted to the terminal's width, progress bars;
- `moai_ckpt.tools.cli`: ``demo`` and the ``chaos`` group.

``moai-ckpt`` (the console script) and ``python -m moai_ckpt.cli`` run `main`.
"""

from __future__ import annotations

from moai_ckpt.cli import interop, ops, plan, restore, snapshots, stats
from moai_ckpt.cli.base import app, register
from moai_ckpt.tools import cli as tools

register(
    app,
    snapshots.list_snapshots,
    snapshots.inspect_snapshot,
    snapshots.verify_snapshots,
    snapshots.prune_snapshots,
    tools.demo_command,
    interop.export_weights,
    interop.import_dcp_command,
    interop.export_dcp_command,
    restore.restore_run,
    restore.replay_run,
    ops.capture_command,
    ops.diff_ops_command,
    plan.plan_command,
    stats.stats_command,
)
app.add_typer(tools.chaos_app)


def main() -> None:
    """Entry point of the ``moai-ckpt`` console script."""
    app(prog_name="moai-ckpt")


__all__ = ["app", "main"]
