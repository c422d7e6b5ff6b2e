"""Pruning a whole run: its snapshots by retention policies, then the op-stream logs only deleted ones could replay.

The two layers prune on their own: `Checkpointer.prune` deletes snapshots (`moai_ckpt.pruner`)
and knows nothing of the log; `replay.log.prune_logs` deletes logs older than a given snapshot.
`prune_run` sits above both and runs them in that order, so a log is deleted only after every
snapshot it follows is gone. It also gives the snapshot layer what only the log knows: the
metrics each snapshot's step logged (for `KeepBest`, `LogMetrics`), and which snapshots a log
still needs. ``moai-ckpt prune`` calls it, and a `fault_tolerant` run calls it after each commit
(`RunRetention`).

What a log needs: the records after the newest committed snapshot are replayed from it, and
`replay.log.prune_logs` keeps the older log that holds them when the run died before moving them
over, so no older snapshot is needed for them. A live run knows more: a newer snapshot that failed
its checks is not one it can resume from, so the newest snapshot it can use (the one its log
continues) is kept too. With a `KeepBest` policy the log before the oldest kept snapshot stays,
for it holds the metric of that snapshot's step.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Collection, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from moai_ckpt.checkpointer import Checkpointer
from moai_ckpt.errors import MoaiCkptError, redact_url
from moai_ckpt.pruner import PrunePlan, manifest_metrics
from moai_ckpt.retention import KeepBest, MetricSource, RetentionPolicy, policies_of
from replay.log import StepRecord, log_bases, prune_logs, read_log

__all__ = ["LogMetrics", "RunRetention", "prune_run", "record_metrics"]

log = logging.getLogger("moai_ckpt")


def record_metrics(record: StepRecord) -> dict[str, float]:
    """The metrics a step logged, by name: ``loss``, ``grad_norm`` and every numeric hyperparameter."""
    out = {
        name: float(value)
        for name, value in record.hparams.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }
    if record.digests.loss is not None:
        out["loss"] = record.digests.loss
    if record.digests.grad_norm is not None:
        out["grad_norm"] = record.digests.grad_norm
    return {k: v for k, v in out.items() if math.isfinite(v)}


class LogMetrics:
    """A `MetricSource` that reads what each snapshot's step logged, then the manifest's info.

    The record of a snapshot at step S is in the log of the snapshot before S; values found are
    kept (a step's record never changes), so a run that prunes after every commit reads each log
    about once.
    """

    def __init__(self, ckpt: Checkpointer) -> None:
        self.storage = ckpt.storage
        self.fallback = manifest_metrics(ckpt.catalog)
        self.cache: dict[int, dict[str, float]] = {}

    def __call__(self, steps: Sequence[int]) -> dict[int, dict[str, float]]:
        wanted = [s for s in steps if s not in self.cache]
        bases = log_bases(self.storage)
        by_base: dict[int, set[int]] = {}
        for step in wanted:
            before = [b for b in bases if b < step]
            if before:
                by_base.setdefault(before[-1], set()).add(step)
        for base, in_it in by_base.items():
            for record in read_log(self.storage, base).records:
                if record.step in in_it:
                    self.cache[record.step] = record_metrics(record)
        missing = [s for s in wanted if s not in self.cache]
        found = {s: self.cache[s] for s in steps if s in self.cache}
        return found | (self.fallback(missing) if missing else {})


def prune_run(
    ckpt: Checkpointer,
    keep: object,
    *,
    dry_run: bool = False,
    protect: Mapping[int, str] | None = None,
    metrics: MetricSource | None = None,
) -> PrunePlan:
    """Delete the committed snapshots no policy keeps, leftovers of failed saves, and the logs of
    the deleted snapshots; returns every snapshot folder with what happened to it and why.

    Args:
        ckpt: the run.
        keep: the retention policies (`moai_ckpt.retention.policies_of`: an int N is the last N).
        dry_run: only say what would go; delete nothing (logs included).
        protect: steps to keep whatever the policies say, with the reason.
        metrics: where `KeepBest` reads its values (default: `LogMetrics`).

    Raises:
        InvalidArgumentError: ``keep`` is no policy, or a `KeepBest` metric no snapshot logged.
    """
    policies = policies_of(keep)
    source = metrics if metrics is not None else LogMetrics(ckpt)
    plan = ckpt.prune_report(policies, dry_run=dry_run, protect=protect, metrics=source)
    if not dry_run:
        kept = [e.step for e in ckpt.scan() if e.status == "committed"]
        if kept:
            prune_logs(ckpt.storage, oldest_kept=_oldest_log_kept(ckpt, policies, kept[0]))
    return plan


def _oldest_log_kept(ckpt: Checkpointer, policies: Sequence[RetentionPolicy], oldest: int) -> int:
    """The base of the oldest log to keep: that of ``oldest``, or of the log holding its metric."""
    if not any(isinstance(p, KeepBest) for p in policies):
        return oldest
    before = [b for b in log_bases(ckpt.storage) if b < oldest]
    return before[-1] if before else oldest


class RunRetention:
    """Prunes a `fault_tolerant` run after each commit, in the background, on the coordinator.

    Prunes run one after another, in the order of the commits. A failed prune only warns: the snapshot is committed whatever happens here.

    Args:
        ckpt: the run's checkpointer.
        policies: what to keep.
    """

    def __init__(self, ckpt: Checkpointer, policies: Sequence[RetentionPolicy]) -> None:
        self.ckpt = ckpt
        self.policies = tuple(policies)
        self.metrics = LogMetrics(ckpt)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="moai-prune")
        self._running: Future[None] | None = None
        self._lock = threading.Lock()
        self.pruned = 0  # how many prunes ran

    def committed(self, usable: int, unusable: Collection[int]) -> None:
        """A snapshot committed; ``usable`` is the newest one the run can resume from."""
        with self._lock:
            newer_unusable = sorted(s for s in unusable if s > usable)
            protect = (
                {usable: f"the run's log continues from it (step {newer_unusable[0]} failed its checks)"}
                if newer_unusable
                else {}
            )
            self._running = self._executor.submit(self._prune, protect)

    def _prune(self, protect: dict[int, str]) -> None:
        try:
            plan = prune_run(self.ckpt, self.policies, protect=protect, metrics=self.metrics)
            self.pruned += 1
            if plan.deleted:
                log.info("kept by %s: %s", redact_url(self.ckpt.url), ", ".join(map(str, plan.kept)))
        except (MoaiCkptError, OSError) as exc:
            log.warning("pruning %s after a commit failed (snapshots stay): %s", redact_url(self.ckpt.url), exc)

    def wait(self) -> None:
        """Wait for the prune in progress, if any."""
        with self._lock:
            running = self._running
        if running is not None:
            running.result()

    def close(self) -> None:
        """Wait for the prune in progress, then stop the thread."""
        self.wait()
        self._executor.shutdown(wait=True)
