"""Pruning a whole run: its snapshots, then the op-stream logs that only the deleted ones could replay.

The two layers prune on their own: `Checkpointer.prune` deletes snapshots (`moai_ckpt.retention`)
and knows nothing of the log; `replay.log.prune_logs` deletes logs older than a given snapshot.
`prune_run` sits above both and runs them in that order, so a log is deleted only after every
snapshot it follows is gone. ``moai-ckpt prune`` calls it.
"""

from __future__ import annotations

from moai_ckpt.checkpointer import Checkpointer
from replay.log import prune_logs


def prune_run(ckpt: Checkpointer, keep: int, *, dry_run: bool = False) -> list[int]:
    """Delete all but the newest ``keep`` committed snapshots, leftovers of failed saves, and the
    logs of the deleted snapshots; returns the steps of the snapshots deleted.

    Args:
        ckpt: the run.
        keep: how many of the newest committed snapshots to keep (at least 1).
        dry_run: only say which snapshots would go; delete nothing (logs included).
    """
    deleted = ckpt.prune(keep, dry_run=dry_run)
    if not dry_run:
        kept = [e.step for e in ckpt.scan() if e.status == "committed"]
        if kept:
            prune_logs(ckpt.storage, oldest_kept=kept[0])
    return deleted
