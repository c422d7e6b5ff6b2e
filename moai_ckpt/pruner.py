"""Pruning the snapshots of a run: what the retention policies give up, and the leftovers of failed saves.

Whatever the policies (`moai_ckpt.retention`) say, `Pruner` never deletes the newest committed
snapshot, one the caller protects (the layer above names those a log still needs), one this
process is writing, or one another live writer has claimed.

Leftovers are the snapshot folders without a valid commit marker. One older than the newest
commit is abandoned; a newer one may be a save in progress (here or in another process) and
is deleted only once nothing in it has changed for ``leftover_grace_s`` and no live writer has
claimed it. Deleting un-commits first (the marker goes before anything it vouches for), so a
prune that stops half-way leaves leftovers, never a snapshot that is committed but incomplete.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from moai_ckpt.catalog import SnapshotCatalog
from moai_ckpt.errors import InvalidArgumentError, redact_url
from moai_ckpt.layout import commit_key, snapshot_dir
from moai_ckpt.results import SnapshotEntry
from moai_ckpt.retention import MetricSource, RetentionPolicy, RetentionView
from moai_ckpt.writer import RunWriter

__all__ = ["PrunePlan", "PruneRow", "Pruner", "manifest_metrics"]

log = logging.getLogger("moai_ckpt")


def manifest_metrics(catalog: SnapshotCatalog) -> MetricSource:
    """Metrics from the numbers at the top of each snapshot's manifest ``info`` (``save(..., info=...)``)."""

    def metrics(steps: Sequence[int]) -> dict[int, dict[str, float]]:
        out = {}
        for step in steps:
            info = catalog.open(step).manifest.info
            numbers = {k: float(v) for k, v in info.items() if isinstance(v, int | float) and not isinstance(v, bool)}
            if numbers:
                out[step] = numbers
        return out

    return metrics


@dataclass(frozen=True)
class PruneRow:
    """One snapshot folder in a prune: what happens to it and why."""

    step: int
    status: str  # committed | uncommitted | invalid | unsupported
    delete: bool
    reason: str
    total_bytes: int | None = None
    created: str | None = None


@dataclass
class PrunePlan:
    """What a prune deletes and keeps, every snapshot folder with its reason, oldest first."""

    rows: list[PruneRow] = field(default_factory=list)
    dry_run: bool = False

    @property
    def deleted(self) -> list[int]:
        """The steps deleted (or, for a dry run, that would be)."""
        return [r.step for r in self.rows if r.delete]

    @property
    def kept(self) -> list[int]:
        """The committed steps kept."""
        return [r.step for r in self.rows if not r.delete and r.status == "committed"]


class Pruner:
    """Deletes what the retention policies give up, and the leftovers of failed saves.

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

    def plan(
        self,
        policies: Sequence[RetentionPolicy],
        *,
        protect: Mapping[int, str] | None = None,
        metrics: MetricSource | None = None,
    ) -> PrunePlan:
        """What a prune with ``policies`` would delete and keep, and why (nothing is deleted).

        Args:
            policies: a snapshot any of them keeps is kept.
            protect: steps kept whatever the policies say, with the reason (a log needs them).
            metrics: where `KeepBest` reads its values (default: the manifests' info).

        Raises:
            InvalidArgumentError: no policy, or a `KeepBest` metric no snapshot logged.
        """
        if not policies:
            raise InvalidArgumentError("prune needs at least one retention policy (keep=N keeps the last N)")
        entries = self.catalog.scan()
        committed = [e for e in entries if e.status == "committed"]
        view = RetentionView(committed, metrics if metrics is not None else manifest_metrics(self.catalog))
        reasons: dict[int, list[str]] = {}
        for policy in policies:
            for step in policy.keep(view):
                reasons.setdefault(step, []).append(policy.describe())
        latest = committed[-1].step if committed else -1
        for step, why in (protect or {}).items():
            reasons.setdefault(step, []).append(why)
        if committed:
            reasons.setdefault(latest, []).append("the newest committed")
        leftovers = self._leftovers(entries, latest)
        busy = self.writer.busy()
        claimed = self.writer.claimed_elsewhere({e.step for e in entries if e.status != "committed"})
        return PrunePlan([self._row(e, reasons, leftovers, busy, claimed) for e in entries])

    def prune(
        self,
        policies: Sequence[RetentionPolicy],
        *,
        dry_run: bool = False,
        protect: Mapping[int, str] | None = None,
        metrics: MetricSource | None = None,
    ) -> PrunePlan:
        """Delete the committed snapshots no policy keeps, and leftovers; returns the plan carried out."""
        plan = self.plan(policies, protect=protect, metrics=metrics)
        plan.dry_run = dry_run
        if not dry_run:
            for step in plan.deleted:
                if step in self.writer.busy():  # a save of this step started meanwhile
                    continue
                # everything below is listed and checked first, then un-committed, then deleted
                self.storage.delete_tree(snapshot_dir(step), first=[commit_key(step)])
                log.info("pruned step %d from %s", step, redact_url(self.storage.url))
        return plan

    @staticmethod
    def _row(
        entry: SnapshotEntry,
        reasons: Mapping[int, list[str]],
        leftovers: set[int],
        busy: set[int],
        claimed: set[int],
    ) -> PruneRow:
        body = entry.marker.body if entry.marker is not None else None
        delete, why = _verdict(entry, reasons, leftovers, busy, claimed)
        return PruneRow(
            entry.step,
            entry.status,
            delete,
            why,
            total_bytes=body.total_bytes if body is not None else None,
            created=body.created if body is not None else None,
        )

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


def _verdict(
    entry: SnapshotEntry, reasons: Mapping[int, list[str]], leftovers: set[int], busy: set[int], claimed: set[int]
) -> tuple[bool, str]:
    """Whether a prune deletes ``entry``, and why."""
    if entry.step in busy:
        return False, "being written by this process"
    if entry.status == "committed":
        why = reasons.get(entry.step)
        return (False, ", ".join(why)) if why else (True, "no policy keeps it")
    if entry.step in claimed:
        return False, "claimed by another live writer"
    if entry.step in leftovers:
        return True, "leftover of a failed save"
    if entry.status == "unsupported":
        return False, "a newer format: left alone"
    return False, "newer than the latest commit: may be a save running"
