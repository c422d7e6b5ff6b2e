"""When a run takes a snapshot, and taking it: decision policies and the `SnapshotScheduler`.

Decision policies say *whether* a snapshot is due after a step, from what every rank agreed on:

- `EveryNSteps`: every ``snapshot_every`` steps;
- `EveryTSeconds`: once ``snapshot_every_s`` seconds passed since the last one, by rank 0's clock
  (each rank hands its clock's verdict to the recorder with the step; rank 0's comes back, the
  same on every rank, ``lag`` steps later);
- `OnPreemption`: a SIGTERM or SIGINT: the ranks agree on a step, snapshot it synchronously and
  exit.

A local tier (`moai_ckpt.run.tiers.LocalTier`), when the run has one, takes a snapshot of every
``local_every``-th step run live, besides.

`WhileReplaying` says what a due snapshot does while the step replays a logged one, and the
scheduler takes it: in the background or not, settling the previous one first, moving the log
over once it commits, counting (not raising) a snapshot that failed on storage.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from types import FrameType
from typing import Any, Protocol

import torch

from moai_ckpt.checkpointer import Checkpointer
from moai_ckpt.distributed import CoordinationError, RankLostError, SingleProcess, World
from moai_ckpt.errors import CorruptSnapshotError, StorageError
from moai_ckpt.pruning import RunRetention
from moai_ckpt.results import SaveHandle
from moai_ckpt.run.options import RunOptions
from moai_ckpt.run.tiers import LocalTier
from moai_ckpt.run.tracked import Tracked
from replay.recorder import Decision, Recorder

log = logging.getLogger("moai_ckpt.run")

# what a failed snapshot raises on the rank that failed (storage, checks) and on the others
SNAPSHOT_FAILURES = (StorageError, CorruptSnapshotError, CoordinationError)

__all__ = [
    "EveryNSteps",
    "EveryTSeconds",
    "OnPreemption",
    "SnapshotPolicy",
    "SnapshotScheduler",
    "StepOutcome",
    "WhileReplaying",
]


@dataclass(frozen=True)
class StepOutcome:
    """What the policies see after step ``step``: the decision gathered from every rank for step ``step - lag``."""

    step: int
    lag: int
    decision: Decision | None
    last_snapshot_step: int  # the step of the last snapshot taken or restored


class SnapshotPolicy(Protocol):
    """Whether a snapshot is due after a step."""

    def due(self, outcome: StepOutcome) -> bool: ...


@dataclass(frozen=True)
class EveryNSteps:
    """A snapshot at every step that is a multiple of ``steps``."""

    steps: int

    def due(self, outcome: StepOutcome) -> bool:
        return outcome.step % self.steps == 0


@dataclass(frozen=True)
class EveryTSeconds:
    """A snapshot once ``seconds`` passed since the last one, as rank 0's clock says."""

    seconds: float

    def clock_due(self, since: float) -> bool:
        """This rank's verdict at a step's end (monotonic ``since``: when the last snapshot was taken)."""
        return time.monotonic() - since >= self.seconds

    def due(self, outcome: StepOutcome) -> bool:
        # the verdict is that of step - lag; a snapshot taken since then (the steps after it were
        # submitted before its clock reset) has already answered it
        decision = outcome.decision
        return decision is not None and decision.snapshot and outcome.last_snapshot_step < outcome.step - outcome.lag


class OnPreemption:
    """A stop signal: the run finishes its step, snapshots it, flushes the log and exits with 128 + the signal.

    `on_signal` is the handler `Run.steps` installs for SIGTERM and SIGINT. One process stops
    after the step in progress; several agree on a step from the results they all gathered (the
    step in progress or the next one).
    """

    def __init__(self) -> None:
        self.received: int | None = None

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    def stop(self, outcome: StepOutcome, world_size: int) -> int | None:
        """The signal to stop on after this step, or None."""
        if world_size == 1:
            return self.received
        return outcome.decision.stop if outcome.decision is not None else None


class Action(Enum):
    """What a due snapshot does (see `WhileReplaying`)."""

    TAKE = "take"  # now
    TAKE_CHECKED = "take checked"  # once the replayed step's check passed, over whatever is stored there
    AFTER_REPLAY = "after replay"  # when the replay ends
    SKIP = "skip"


class WhileReplaying:
    """A due snapshot while replaying is taken only of a state its check found bitwise equal.

    On the placement that wrote the log, a replayed step that passed its check is the logged
    run's state: its snapshot lets the next restart skip the steps replayed so far (the log moves
    over with the records still to replay). On another placement the replayed state has drifted
    from what the later records describe, so the snapshot waits for the end of the replay.
    Restore and verify sessions write no snapshots.
    """

    def action(self, *, replaying: bool, writes: bool, strict: bool) -> Action:
        if not writes:
            return Action.SKIP
        if not replaying:
            return Action.TAKE
        return Action.TAKE_CHECKED if strict else Action.AFTER_REPLAY


class SnapshotScheduler:
    """Decides after each step whether to snapshot, and takes the snapshot.

    Args:
        ckpt: the run's checkpointer.
        tracked: what the snapshots hold.
        options: the run's options (``snapshot_every``, ``snapshot_every_s``, ``async_snapshots``).
        writes: whether the run writes snapshots at all (a session does not).
        defer: take a snapshot decided at the end of step S when step S+1 begins (`at_boundary`),
            for loops whose framework does work between steps that the snapshot must include.
    """

    def __init__(
        self, ckpt: Checkpointer, tracked: Tracked, options: RunOptions, *, writes: bool, world: World | None = None
    ) -> None:
        self.ckpt = ckpt
        self.world = world if world is not None else SingleProcess()  # the training thread's agreement
        self.tracked = tracked
        self.async_snapshots = options.async_snapshots
        self.lag = options.lag
        self.timeout_s = 2 * ckpt.options.collective_timeout_s
        self.writes = writes
        self.defer = False
        self.timed = EveryTSeconds(options.snapshot_every_s) if options.snapshot_every_s is not None else None
        self.policies: Sequence[SnapshotPolicy] = [
            *([EveryNSteps(options.snapshot_every)] if options.snapshot_every is not None else []),
            *([self.timed] if self.timed is not None else []),
        ]
        self.preemption = OnPreemption()
        self.while_replaying = WhileReplaying()
        self.unusable: set[int] = set()  # committed snapshots that failed their checks: overwritten when retaken
        self.failures = 0
        self.mark = 0  # moves whenever a snapshot is restored or taken
        self.recorder: Recorder | None = None
        #: prunes after each commit (set by `Run` on the coordinator when the run has ``keep``)
        self.retention: RunRetention | None = None
        self.local: LocalTier | None = None  # this rank's local tier (set once the run exists)
        self.local_every = options.local_every if options.local_tier is not None else None
        self._local_deferred: int | None = None
        self._last_time = time.monotonic()
        self._last_step = 0  # the step of the last snapshot taken or restored
        self._pending: tuple[int, SaveHandle | None] | None = None  # a snapshot being written
        self._deferred: tuple[int, Action] | None = None
        self._after_replay = False  # one fell due while replaying on another placement

    # -- decisions -------------------------------------------------------------------------------

    def restored(self, step: int, recorder: Recorder) -> None:
        """The run starts from the snapshot of ``step``; ``recorder`` logs the steps after it."""
        self.recorder = recorder
        self._last_time = time.monotonic()
        self._last_step = step
        self.mark += 1
        if self.async_snapshots and self.writes and torch.cuda.is_available():
            # the pinned buffers of the first save_async, allocated while the steps run
            self.ckpt.prepare(self.tracked.snapshot_state())

    def clock_due(self) -> bool:
        """This rank's clock's verdict on a timed snapshot, handed to the recorder with the step."""
        return self.timed is not None and self.timed.clock_due(self._last_time)

    def after_step(
        self, step: int, decision: Decision | None, *, replaying: bool, strict: bool, world_size: int
    ) -> int | None:
        """Take (or defer) the snapshot the policies find due after ``step``; returns a signal to stop on."""
        self.ckpt.guard_staged()  # the copies of the last snapshot are complete or ordered by now
        self.poll()
        if self.local_every is not None and self.writes and not replaying and step % self.local_every == 0:
            if self.defer:
                self._local_deferred = step
            else:
                self._take_local(step)
        outcome = StepOutcome(step, self.lag, decision, self._last_step)
        if any(policy.due(outcome) for policy in self.policies):
            action = self.while_replaying.action(replaying=replaying, writes=self.writes, strict=strict)
            if self.defer:
                self._deferred = (step, action)
            else:
                self._act(step, action)
        return self.preemption.stop(outcome, world_size)

    def at_boundary(self) -> None:
        """A step is about to begin (or the loop ends): take the snapshots deferred to now."""
        if self._local_deferred is not None:
            self._take_local(self._local_deferred)
        self._local_deferred = None
        if self._deferred is not None:
            step, action = self._deferred
            self._deferred = None
            self._act(step, action)

    def replay_done(self, step: int) -> None:
        """The replay ended at ``step``: take the snapshot that fell due on a changed placement."""
        if self._after_replay:
            self._after_replay = False
            self.unusable.add(step)  # as for a checked one: whatever is stored there is replaced
            self.take(step)

    def _act(self, step: int, action: Action) -> None:
        if action is Action.TAKE:
            self.take(step)
        elif action is Action.TAKE_CHECKED:
            assert self.recorder is not None
            self.recorder.wait(step, timeout=self.timeout_s)
            self.unusable.add(step)  # whatever is stored at a replayed step failed to restore: replace it
            self.take(step)
        elif action is Action.AFTER_REPLAY:
            self._after_replay = True

    # -- taking snapshots ------------------------------------------------------------------------

    def take(self, step: int) -> None:
        """Snapshot ``step`` now: in the background (settling the previous one first), or at once."""
        self._last_time = time.monotonic()
        self._last_step = step
        self.mark += 1
        overwrite = step in self.unusable
        if self.async_snapshots:
            self.settle()
            info = self.tracked.snapshot_info()
            self._pending = (
                step,
                self.ckpt.save_async(step, self.tracked.snapshot_state(), overwrite=overwrite, info=info),
            )
            return
        self._save(step, overwrite=overwrite)

    def base(self, step: int, entry: dict[str, Any] | None) -> None:
        """The first snapshot of a new run, the base of its log (``entry``: what run.json records)."""
        self.ckpt.run_entry = entry
        # over the leftovers of an interrupted first save
        self.ckpt.save(step, self.tracked.snapshot_state(), info=self.tracked.snapshot_info(), overwrite=True)

    def final(self, step: int) -> None:
        """The loop finished: the finished run's state is a snapshot (the log is flushed first)."""
        assert self.recorder is not None
        self.recorder.drain()
        self.settle()
        if self.ckpt.latest_step() != step:
            self._save(step, overwrite=step in self.unusable)

    def emergency(self, step: int) -> None:
        """A stop signal: snapshot ``step`` synchronously (a failure propagates: the job is ending)."""
        self.at_boundary()
        self.settle()
        if self.ckpt.latest_step() != step:
            self.ckpt.save(step, self.tracked.snapshot_state(), info=self.tracked.snapshot_info())

    def _save(self, step: int, *, overwrite: bool) -> None:
        try:
            self.ckpt.save(step, self.tracked.snapshot_state(), overwrite=overwrite, info=self.tracked.snapshot_info())
        except SNAPSHOT_FAILURES as exc:
            self._failed(step, exc)
            return
        self._committed(step)

    def poll(self) -> None:
        """Settle the snapshots in flight that are done (never waits)."""
        if self.local is not None:
            self.local.poll()
        if self._pending is not None and self._pending[1] is not None and self._pending[1].done():
            self.settle()

    def _take_local(self, step: int) -> None:
        """Snapshot ``step`` to this rank's local tier (collective: every rank, at the same step).

        The older local snapshots go first, but only those every rank has replaced: a rank that
        died before its last local snapshot committed holds the one before, and a restart needs
        a step that every rank holds.
        """
        held = self.local.latest_committed() if self.local is not None else None
        everyone = self.world.all_gather_json(held, "the local snapshot every rank holds")
        if self.local is None:
            return
        shared = None if None in everyone else min(everyone)
        self.local.take(step, self.tracked.snapshot_state(), self.tracked.snapshot_info(), keep_from=shared or held)

    def settle_local(self) -> None:
        """Wait for the local snapshot in flight and release the local tier (the run ends)."""
        if self.local is not None:
            local, self.local = self.local, None
            local.close()

    def settle(self) -> None:
        """Wait for the snapshot in flight; once committed, the log moves over to it."""
        if self._pending is None:
            return
        step, handle = self._pending
        self._pending = None
        if handle is None:
            return
        try:
            handle.result()
        except SNAPSHOT_FAILURES as exc:
            self._failed(step, exc)
            return
        self._committed(step)

    def _committed(self, step: int) -> None:
        self.unusable.discard(step)
        assert self.recorder is not None
        self.recorder.rebase(step)
        if self.retention is not None:
            self.retention.committed(step, self.unusable)

    def _failed(self, step: int, exc: Exception) -> None:
        """A snapshot that could not be written is not fatal: the log goes on from the last one.

        Every rank gets here together: the rank whose storage failed with its own error, the
        others with the `CoordinationError` that names it. A rank that died is another matter
        (`RankLostError`): that propagates and ends the job.
        """
        if isinstance(exc, RankLostError):
            raise exc
        self.failures += 1
        log.warning("the snapshot of step %d failed and is skipped (the log continues): %s", step, exc)
