"""What prune keeps: a retention policy over committed snapshots, and the leftovers of failed saves.

A `RetentionPolicy` is a small interface: shown every committed snapshot (oldest first, each with
its commit marker), it names the steps to keep. `KeepLatest` keeps the newest N; other policies
(every Mth step, the best by a metric in the manifest's info, by age) implement the same method.
Whatever the policy says, `Pruner` never deletes the newest committed snapshot.

Leftovers are the snapshot folders without a valid commit marker. One older than the newest
commit is abandoned; a newer one may be a save in progress (here or in another process) and
is deleted only once nothing in it has changed for ``leftover_grace_s`` and no live writer has
claimed it. Deleting un-commits first (the marker goes before anything it vouches for), so a
prune that stops half-way leaves leftovers, never a snapshot that is committed but incomplete.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from moai_ckpt.catalog import SnapshotCatalog
from moai_ckpt.errors import redact_url
from moai_ckpt.layout import commit_key, snapshot_dir
from moai_ckpt.results import SnapshotEntry
from moai_ckpt.writer import RunWriter

log = logging.getLogger("moai_ckpt")


class RetentionPolicy(Protocol):
    """Which committed snapshots a prune keeps."""

    def keep(self, committed: Sequence[SnapshotEntry]) -> set[int]:
        """The steps to keep, of ``committed`` (oldest first, each with its marker)."""
        ...


@dataclass(frozen=True)
class KeepLatest:
    """Keep the newest ``n`` committed snapshots (at least one)."""

    n: int

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError("prune keeps at least the newest committed snapshot (keep >= 1)")

    def keep(self, committed: Sequence[SnapshotEntry]) -> set[int]:
        return {e.step for e in committed[-self.n :]}


class Pruner:
    """Deletes what a retention policy gives up, and the leftovers of failed saves.

    Args:
        catalog: the run's snapshots (and its storage).
        writer: this process as the run's writer: the steps it is writing are never deleted.
        leftover_grace_s: how long an uncommitted snapshot newer than the latest commit must
            stay unchanged before it is taken for abandoned.
    """

    def __init__(self, catalog: SnapshotCatalog, writer: RunWriter, *, leftover_grace_s: float) -> None:
        self.catalog = catalog
        self.storage = catalog.storage
        self.writer = writer
        self.leftover_grace_s = leftover_grace_s

    def prune(self, policy: RetentionPolicy, *, dry_run: bool = False) -> list[int]:
        """Delete the committed snapshots ``policy`` does not keep, and leftovers; returns the steps deleted."""
        entries = self.catalog.scan()
        committed = [e for e in entries if e.status == "committed"]
        latest = committed[-1].step if committed else -1
        kept = policy.keep(committed) | {latest}
        doomed = {e.step for e in committed if e.step not in kept} | self._leftovers(entries, latest)
        doomed -= self.writer.busy()
        doomed -= self.writer.claimed_elsewhere(doomed - {e.step for e in committed})
        if not dry_run:
            for step in sorted(doomed):
                # everything below is listed and checked first, then un-committed, then deleted
                self.storage.delete_tree(snapshot_dir(step), first=[commit_key(step)])
                log.info("pruned step %d from %s", step, redact_url(self.storage.url))
        return sorted(doomed)

    def _leftovers(self, entries: Sequence[SnapshotEntry], latest: int) -> set[int]:
        """Uncommitted snapshots older than the latest commit, or idle for the grace period."""
        return {
            e.step
            for e in entries
            if e.status in ("uncommitted", "invalid")
            and (e.step < latest or self._idle_for(e.step) >= self.leftover_grace_s)
        }

    def _idle_for(self, step: int) -> float:
        """Seconds since anything in an uncommitted snapshot changed.

        0 where the storage cannot tell (`Storage.supports_modification_times`), so such a
        directory is never taken for abandoned.
        """
        newest = self.storage.newest_change(snapshot_dir(step))
        return 0.0 if newest is None else max(time.time() - newest, 0.0)
