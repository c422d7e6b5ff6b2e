"""Resuming a run: restore the newest usable snapshot, then open the log after it.

`Resumption.restore` picks the snapshot (every rank takes rank 0's choice) and loads the newest
one that passes every check; older ones stand in for corrupt ones, and when none is usable but a
log from step 0 is there, the state the training function built is replayed from step 0.
`Resumption.open_log` reads the log after that base (rank 0 first settles it: a torn tail
dropped, damaged segments set aside under ``log/quarantine/``), builds the replay report and
starts the `Recorder` that logs or checks each step.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from moai_ckpt.checkpointer import Checkpointer
from moai_ckpt.distributed import CoordinationError, RankLostError, World
from moai_ckpt.errors import CorruptSnapshotError, MoaiCkptError, UnsupportedFormatError
from moai_ckpt.layout import quarantine_key
from moai_ckpt.results import skipped_message
from moai_ckpt.run.options import RunOptions
from moai_ckpt.run.phases import last_sign_of_life
from moai_ckpt.run.session import RunMode
from moai_ckpt.run.tiers import PERSISTENT, LocalTier, restore_newest
from moai_ckpt.run.tracked import Tracked
from moai_ckpt.storage import Storage
from replay.check import ReplayReport
from replay.log import LogContents, LogWriter, Placement, StepRecord, log_bases, read_log, records_after, segments
from replay.recorder import Recorder

log = logging.getLogger("moai_ckpt.run")

__all__ = ["OpenLog", "RestorePoint", "Resumption", "current_placement", "placement_changes", "quarantine"]


def current_placement(world_size: int, device: torch.device) -> Placement:
    """The placement this process runs on: world size, device type and model, torch release."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return Placement(world_size=world_size, device_type=device.type, device_name=name, torch=torch.__version__)


def placement_changes(logged: Placement, now: Placement) -> list[str]:
    """What differs between the placement a log was written on and this one, plan included."""
    changes = logged.differences(now)
    before, after = (logged.model_extra or {}).get("plan"), (now.model_extra or {}).get("plan")
    if before != after and (before is not None or after is not None):
        changes.append(f"plan: {before or 'none'} -> {after or 'none'}")
    return changes


def quarantine(storage: Storage, base: int, last_good: int) -> None:
    """Move the segments of ``log/<base>`` from the damaged one on aside, keeping the good records.

    The segments are copied under ``log/quarantine/<base>/`` (for a post-mortem), then deleted;
    the valid records of a damaged segment are rewritten first, as after a torn tail.
    """
    contents = read_log(storage, base)
    writer = LogWriter(storage, base)
    all_segments = segments(storage, base)
    damaged = [(first, key) for first, last, key in all_segments if last > last_good]
    # a damaged segment's valid records: those not also held by a surviving segment
    held = max((last for _, last, key in all_segments if last <= last_good), default=base)
    keep = [r for r in contents.records if r.step > held]
    for _, key in damaged:
        storage.write(quarantine_key(key), storage.read(key))
    if keep:
        writer.last_step = keep[0].step - 1
        writer.copy(keep, contents)
    storage.delete([key for _, key in damaged])


@dataclass
class RestorePoint:
    """Where a run resumes: the restored step, or None for a new run whose base is still to take."""

    base: int | None
    from_initial_state: bool = False  # no snapshot was usable: the run rebuilt step 0 itself
    restore_s: float = 0.0
    tier: str = PERSISTENT  # where this rank's snapshot came from
    nbytes: int = 0  # the restored snapshot's size
    restarted: bool = False  # an earlier incarnation's snapshot was restored (not a new run)
    last_seen: float | None = None  # the earlier incarnation's lease renewal (Unix time), if seen


@dataclass
class OpenLog:
    """The log a run continues after its base: what it replays, and the recorder that logs or checks."""

    base: int
    contents: LogContents
    records: dict[int, StepRecord]  # the logged steps this run replays, by step
    stop: int | None  # the step the run stops at (a session's target)
    recorder: Recorder
    report: ReplayReport
    placement: Placement  # where the steps this run writes are recorded as run


class Resumption:
    """The start of a run on its run directory (collective: every rank together)."""

    def __init__(
        self,
        ckpt: Checkpointer,
        world: World,
        log_world: World,
        mode: RunMode,
        tracked: Tracked,
        options: RunOptions,
        unusable: set[int],
    ) -> None:
        self.ckpt = ckpt
        self.world = world
        self.log_world = log_world
        self.mode = mode
        self.tracked = tracked
        self.options = options
        self.unusable = unusable  # committed snapshots that failed their checks (overwritten when retaken)
        self.local: LocalTier | None = None  # this rank's local tier, once the run has a run.json
        self.last_record_at: float | None = None  # the log's newest record (Unix time), when read

    def open_local(self) -> LocalTier | None:
        """This rank's local tier, if the options set one and the run exists (a live run only)."""
        if self.local is None and self.mode.writes:
            self.local = LocalTier.open(
                self.options.local_tier,
                self.options.local_every,
                self.ckpt.storage,
                rank=self.world.rank,
                world_size=self.world.world_size,
                options=self.ckpt.options,
                background=self.options.async_snapshots,
            )
        return self.local

    def restorable_steps(self) -> list[int]:
        bound = self.mode.restore_bound()
        return [s for s in self.ckpt.steps() if bound is None or s <= bound]

    def restore(self) -> RestorePoint:
        """Restore the newest usable snapshot into the tracked objects.

        A live run takes the run's writer lease first, so a second job on the same run fails now,
        naming the first, before a long restore.
        """
        started = time.perf_counter()
        last_seen = last_sign_of_life(self.ckpt.storage) if self.world.rank == 0 and self.mode.writes else None
        if self.mode.writes:
            self.ckpt.acquire()
        steps = self.restorable_steps()
        latest = self.world.broadcast_json(steps[-1] if steps else None, "choosing the snapshot to resume")
        if latest is not None:
            usable = [s for s in steps if s <= latest]
            tiered = self.mode.writes and self.options.local_tier is not None
            point = self._restore_from_tiers(usable) if tiered else self._restore_newest_usable(usable)
        else:
            self.mode.require_snapshot(self.ckpt.url)
            point = RestorePoint(None)
            if 0 in log_bases(self.ckpt.storage):
                # the snapshot of step 0 is gone or its marker is damaged, but its log is there: the
                # training function has just built step 0's state, and replaying checks every step
                log.warning("the snapshot of step 0 is missing or damaged; replaying the log from the state built now")
                self.unusable.add(0)
                point = RestorePoint(0, from_initial_state=True)
        if self.world.rank == 0:
            self._warn_skipped(point.base or 0, self.mode.restore_bound())
        point.restore_s = time.perf_counter() - started
        signs = [t for t in (last_seen, self.last_record_at) if t is not None]
        point.restarted, point.last_seen = point.base is not None, max(signs, default=None)
        return point

    def _warn_skipped(self, restored: int, bound: int | None) -> None:
        """Say which newer snapshots were passed over because their commit marker is damaged."""
        skipped = [e for e in self.ckpt.damaged_after(restored) if bound is None or e.step <= bound]
        if skipped:
            log.warning("%s", skipped_message(skipped, restored))

    def _restore_from_tiers(self, steps: list[int]) -> RestorePoint:
        """Restore the newest step every rank can restore, from its local tier or the persistent one.

        A local snapshot counts only if the log holds its step (the log must stay whole: a step
        past the log's end would never be logged).
        """
        local = self.open_local()
        logged = None
        if self.world.rank == 0:
            contents = records_after(self.ckpt.storage, steps[-1])
            logged = contents.last_step
            self.last_record_at = contents.records[-1].wall_time if contents.records else None
        newest_local = self.world.broadcast_json(logged, "reading how far the log goes")
        restored = restore_newest(
            self.world,
            self.ckpt,
            local,
            steps,
            newest_local=newest_local,
            fresh_state=self.tracked.snapshot_state,
            keep=self.tracked.keep_restored,
            unusable=self.unusable,
        )
        if restored is None:
            return self._restore_newest_usable([])  # nothing restorable: as when every snapshot is corrupt
        log.info("restored step %d from the %s tier (%.1f MB)", restored.step, restored.tier, restored.nbytes / 1e6)
        return RestorePoint(restored.step, tier=restored.tier, nbytes=restored.nbytes)

    def _restore_newest_usable(self, steps: list[int]) -> RestorePoint:
        """Restore the newest snapshot that passes every check; older ones stand in for corrupt ones.

        A corrupt snapshot is never loaded: the run restores an older one and replays the log
        from there (the logs of later snapshots continue it). The corrupt ones are overwritten
        when the run next snapshots at their step.
        """
        problems = []
        for candidate in reversed(steps):
            try:
                state = self.tracked.snapshot_state()
                self.ckpt.restore(state, step=candidate)
                self.tracked.keep_restored(state)
            except (CorruptSnapshotError, UnsupportedFormatError, CoordinationError) as exc:
                if isinstance(exc, RankLostError):
                    raise
                problems.append(f"step {candidate}: {exc}")
                self.unusable.add(candidate)
                log.warning("the snapshot of step %d cannot be restored (%s); trying an older one", candidate, exc)
                continue
            if problems:
                log.warning("restored the snapshot of step %d instead of newer unusable ones: %s", candidate, problems)
            return RestorePoint(candidate, nbytes=self._size(candidate))
        if 0 in log_bases(self.ckpt.storage):
            # the state at step 0 is what the training function itself builds, and the log holds
            # every step since: replaying them from the fresh objects checks each one, so an
            # initial state that differs from the original is reported, never silently used (the
            # snapshot of step 0 failed its checks, or its marker is damaged and it is not listed)
            self.unusable.add(0)
            log.warning(
                "no snapshot can be restored (%s); starting from the state the training function builds "
                "(step 0) and replaying the log from step 1",
                "; ".join(problems),
            )
            return RestorePoint(0, from_initial_state=True)
        raise CorruptSnapshotError("no committed snapshot could be restored: " + "; ".join(problems), url=self.ckpt.url)

    def open_log(self, point: RestorePoint, device: torch.device) -> OpenLog:
        """Read the log after ``point.base`` (rank 0 of a live run settles it first); start the recorder."""
        base = point.base
        assert base is not None
        settle = self.world.rank == 0 and self.mode.writes  # a session reads the log as it is
        writer, problem = self._settle_log(base) if settle else (None, None)
        self.world.barrier("resuming the log")
        contents = records_after(self.ckpt.storage, base)  # rank 0 has settled it
        if problem is None and contents.corruption is not None:
            problem = str(contents.corruption)
        stop = self.mode.stop_step(contents.last_step, self.ckpt.url)
        usable = [r for r in contents.records if stop is None or r.step <= stop]
        placement = current_placement(self.world.world_size, device)
        if self.tracked.plan_label is not None:
            placement = Placement.model_validate({**placement.model_dump(), "plan": self.tracked.plan_label})
        changed = sorted(
            {d for r in usable for d in placement_changes(contents.placement(r.step) or placement, placement)}
        )
        strict = self.mode.replay_strict(not changed)
        report = ReplayReport(
            base_step=base,
            first_step=base + 1,
            last_step=base,
            logged_last_step=contents.last_step,
            strict=strict,
            placement_logged=contents.placement(usable[0].step) if usable else None,
            placement_now=placement,
            placement_changes=changed,
            log_problem=problem,
            from_initial_state=point.from_initial_state,
            rank_local=self._rank_local_restored(point),
            restore_s=point.restore_s,
        )
        recorder = Recorder(
            self.log_world,
            writer,
            contents,
            strict=strict,
            names=[],
            sharded=[],
            flush_seconds=self.options.log_flush_seconds,
            exact=not changed,
        )
        recorder.done_step = base
        if usable:
            log.info(
                "resumed from the snapshot of step %d in %.2f s; replaying steps %d..%d from the log%s",
                base,
                point.restore_s,
                base + 1,
                usable[-1].step,
                f" on a changed placement ({'; '.join(changed)}): drift is reported" if changed else "",
            )
        records = {r.step: r for r in usable}
        return OpenLog(base, contents, records, stop, recorder, report, placement)

    def _size(self, step: int) -> int:
        """The snapshot's size for the report (0 when its marker cannot be read again)."""
        try:
            return self.ckpt.marker(step).body.total_bytes
        except MoaiCkptError:
            return 0

    def _rank_local_restored(self, point: RestorePoint) -> dict[str, str]:
        """Which copy of each rank-local array the restore of the base took (for the replay report)."""
        restored = self.ckpt.last_restore
        if restored is None or restored.step != point.base or point.from_initial_state:
            return {}
        return restored.rank_local.summary()

    def _flushed(self, last_step: int, nbytes: int, seconds: float) -> None:
        """A log segment is durable: its event (written on the recorder thread, no stall of its own)."""
        self.ckpt.events.emit("log_flush", last_step, seconds, bytes=nbytes)

    def _settle_log(self, base: int) -> tuple[LogWriter, str | None]:
        """Rank 0: continue the log after ``base``; set damaged records aside (nothing is deleted).

        Returns the writer and, if the log is damaged, what is wrong with it.
        """
        storage = self.ckpt.storage
        contents = records_after(storage, base)
        if contents.torn_tail:
            log.warning("dropped a torn log tail (a write cut short by the crash): %s", contents.torn_tail)
        problem = None
        if contents.corruption is not None:
            problem = f"{contents.corruption}"
            if contents.carried_from is None:
                quarantine(storage, base, contents.last_step)
                contents = records_after(storage, base)  # an older log may hold intact copies
            log.warning(
                "the log is damaged: %s. The damaged segments are kept under log/quarantine/; replaying up "
                "to step %d, the steps after it run again live",
                problem,
                contents.last_step,
            )
        writer, resumed = LogWriter.resume(
            storage,
            base,
            flush_every=self.options.log_flush_every,
            fence=self.ckpt.check_writer,
            on_flush=self._flushed,
        )
        if contents.last_step > resumed.last_step:  # the snapshot committed before its log moved over
            writer.copy([r for r in contents.records if r.step > resumed.last_step], contents)
        return writer, problem
