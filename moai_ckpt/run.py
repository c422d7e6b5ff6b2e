"""`fault_tolerant`: wrap a training function so a killed run resumes at its last completed step.

    @moai_ckpt.fault_tolerant(storage="runs/r7", snapshot_every=100)
    def train(run):
        model, opt = build()
        run.track(model=model, optim=opt)
        run.sampler(len(dataset), global_batch_size=256)
        for step in run.steps(10_000):
            indices = run.batch()                 # this rank's samples of the global batch
            loss = ...
            run.record(loss=loss)                 # the step's results (logged, or checked on replay)

On start, the run restores the newest committed snapshot S, then *replays* steps S+1..F from the
op-stream log (``run.replaying`` is True: skip side effects), checking every step against its
record, and continues live from F+1. Each completed step is logged by a background thread; with
the default policy its record is durable before the next step completes. Snapshots are taken
every ``snapshot_every`` steps and/or ``snapshot_every_s`` seconds (asynchronously by default).
SIGTERM/SIGINT take a snapshot and flush the log before exiting; a user exception flushes the log
and propagates.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import timedelta
from types import FrameType
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from moai_ckpt import faults
from moai_ckpt.capture import PartialState
from moai_ckpt.checkpointer import Checkpointer
from moai_ckpt.distributed import CoordinationError, RankLostError, World, current_world
from moai_ckpt.entry import function_spec, record_call
from moai_ckpt.errors import (
    CorruptSnapshotError,
    MoaiCkptError,
    SnapshotNotFoundError,
    StorageError,
    UnsupportedFormatError,
)
from moai_ckpt.layout import RUN_INFO, quarantine_key, replay_report_key
from moai_ckpt.opcapture import capture_divergence, check_policy, hooks_for
from moai_ckpt.results import skipped_message
from moai_ckpt.sampler import GlobalSampler
from moai_ckpt.session import DEVICE_ENV, RestoreComplete, Session, report_progress
from moai_ckpt.trackable import check_trackable
from replay import codec
from replay.check import ReplayReport
from replay.log import LogContents, LogWriter, Placement, StepRecord, log_bases, records_after
from replay.recorder import Recorder, ReplayDivergenceError, StepWork
from replay.statedigest import capture_state
from replay.stepstate import Hyperparameters, StepValues, load_rng_components, parameters_of, rng_components

if TYPE_CHECKING:
    from moai_ckpt.placement import RunPlacement
    from parallel.apply import LossFn, Placed
    from parallel.costmodel import ModelProfile, ProfileOptions
    from parallel.inventory import Device
    from parallel.planner import PlanOptions

log = logging.getLogger("moai_ckpt.run")
R = TypeVar("R")
# what a failed snapshot raises on the rank that failed (storage, checks) and on the others
_SNAPSHOT_FAILURES = (StorageError, CorruptSnapshotError, CoordinationError)

__all__ = ["ReplayDivergenceError", "Run", "fault_tolerant"]


def current_placement(world_size: int, device: torch.device) -> Placement:
    """The placement this process runs on: world size, device type and model, torch release."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return Placement(world_size=world_size, device_type=device.type, device_name=name, torch=torch.__version__)


class Run:
    """The handle a `fault_tolerant` training function receives."""

    def __init__(
        self,
        storage: str,
        *,
        snapshot_every: int | None = 100,
        snapshot_every_s: float | None = None,
        async_snapshots: bool = True,
        log_flush_every: int = 1,
        log_flush_seconds: float | None = None,
        log_sync: bool = False,
        log_lag: int = 1,
        snapshot_at_end: bool = True,
        capture_ops: str = "on_divergence",
        **options: Any,
    ) -> None:
        if log_lag < 1:
            raise ValueError("log_lag must be at least 1 (log_sync=True waits for every record)")
        self.session = Session.from_env()
        if self.session is not None:
            storage = self.session.storage
        self.ckpt = Checkpointer(storage, **options)
        self.capture_policy = check_policy(capture_ops)  # op capture: see moai_ckpt.opcapture
        self._ops = hooks_for(self.capture_policy, self.session.capture_ops if self.session is not None else ())
        timeout = timedelta(seconds=self.ckpt.options.collective_timeout_s)
        self.world: World = current_world(timeout)  # agreement on the training thread
        self._log_world: World = current_world(timeout)  # the recorder thread's own group
        self.snapshot_every = snapshot_every
        self.snapshot_every_s = snapshot_every_s
        self.async_snapshots = async_snapshots
        self.log_flush_every = log_flush_every
        self.log_flush_seconds = log_flush_seconds
        self.lag = 0 if log_sync else log_lag
        self.snapshot_at_end = snapshot_at_end
        self.tracked: dict[str, Any] = {}
        self.step = 0  # the last completed step
        self.replaying = False
        self.replayed = 0
        self.report: ReplayReport | None = None
        self.entry: dict[str, Any] | None = None
        self._sampler: GlobalSampler | None = None
        self._records: dict[int, StepRecord] = {}
        self._contents: LogContents | None = None
        self._recorder: Recorder | None = None
        self._pending: tuple[int, Any] | None = None  # (step, save handle) of a snapshot being written
        self._last_snapshot = time.monotonic()
        self._snapshot_step = 0  # the step of the last snapshot taken or restored
        self._stop_signal: int | None = None
        self._params: tuple[list[str], list[torch.Tensor], list[bool]] | None = None
        self._step_state: dict[str, Any] = {}
        self._user_hparams: dict[str, Any] = {}
        self._started = 0.0
        self._replay_started = 0.0
        self._rng_skipped: set[str] = set()
        self._stats: dict[str, float] = {}
        self._unusable: set[int] = set()  # committed snapshots that failed their checks
        self._from_initial_state = False  # no snapshot was usable: the run rebuilt step 0 itself
        self.snapshot_failures = 0
        self._placed_run: RunPlacement | None = None  # set by place()
        self._snapshot_after_replay = False  # a snapshot fell due while replaying on another placement

    # -- what the training function uses -------------------------------------------------------

    @property
    def rank(self) -> int:
        return self.world.rank

    @property
    def world_size(self) -> int:
        return self.world.world_size

    @property
    def device(self) -> torch.device:
        """Where this rank should put its model: ``cuda:<LOCAL_RANK>`` when CUDA is there, else CPU.

        ``moai-ckpt restore --device`` overrides it (entrypoints that use it follow).
        """
        wanted = os.environ.get(DEVICE_ENV)
        if wanted == "cpu" or (wanted is None and not torch.cuda.is_available()):
            return torch.device("cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % max(torch.cuda.device_count(), 1))

    def track(self, **objects: Any) -> None:
        """Objects whose state is snapshotted (modules, optimizers, schedulers, extras...).

        Raises:
            NotResumableError: an object keeps state no snapshot can hold, so a resumed run would
                silently differ (e.g. a data loader whose workers draw random augmentation from
                generators it does not save); the message says what to do instead. Nothing is
                tracked then.
        """
        for key, obj in objects.items():
            check_trackable(key, obj)
        self.tracked.update(objects)

    def place(
        self,
        model: torch.nn.Module,
        loss_fn: LossFn,
        sample: torch.Tensor | tuple[torch.Tensor, ...],
        *,
        global_batch: int,
        options: PlanOptions | None = None,
        devices: str | list[Device] | None = None,
        layers: list[torch.nn.Module] | None = None,
        profile: ModelProfile | None = None,
        profile_options: ProfileOptions | None = None,
        force_replan: bool = False,
    ) -> Placed:
        """Place ``model`` on the job's ranks with a computed plan (collective; before `steps`).

        The plan the newest snapshot records is kept when the devices are the same; otherwise a
        new one is made (same options and global batch), rank 0 prints the two side by side, and
        the snapshot is restored onto it. Track ``placed.stage_module`` (or ``placed.module``)
        and an optimizer over ``placed.parameters()``: they are snapshotted by whole-model
        parameter names, and every snapshot records the plan. `batch` then returns this
        replica's share of the global batch. See `moai_ckpt.placement`.

        Args:
            model: the whole model, built identically on every rank (its layers must chain).
            loss_fn: ``loss_fn(output, target)``, the mean over its micro-batch.
            sample: one micro-batch of inputs (profiled on `device` by rank 0, then cached).
            global_batch: samples per optimizer step, kept by every plan.
            options: what the planner may choose (every rank is used).
            devices: the job's devices (default: measured on every rank), or a declaration.
            layers: the model's layer sequence, if it does not expose one.
            profile: a ready profile (e.g. analytic) instead of measuring one.
            profile_options: how the profile is measured.
            force_replan: make a new plan even if the devices did not change.

        Raises:
            NoFeasiblePlanError: no placement fits the devices' memory (names the closest one).
        """
        from moai_ckpt.placement import place

        return place(
            self,
            model,
            loss_fn,
            sample,
            global_batch=global_batch,
            options=options,
            devices=devices,
            layers=layers,
            profile=profile,
            profile_options=profile_options,
            force_replan=force_replan,
        )

    @property
    def plan(self) -> Any | None:
        """The `parallel.Plan` the run is placed with (None before `place`)."""
        return self._placed_run.plan if self._placed_run is not None else None

    def sampler(self, num_samples: int, global_batch_size: int, **options: Any) -> GlobalSampler:
        """The run's data position: a `GlobalSampler`, snapshotted with the state."""
        self._sampler = GlobalSampler(num_samples, global_batch_size, **options)
        self.tracked["_data"] = self._sampler
        return self._sampler

    def batch(self) -> list[int]:
        """This rank's sample indices for the current step (the logged ones while replaying)."""
        if self._sampler is None:
            raise RuntimeError("call run.sampler(...) before run.batch()")
        indices = self._sampler.global_batch()
        record = self._records.get(self.step + 1)
        if record is not None and record.samples is not None:
            indices = record.samples  # a mismatch with the sampler is reported by the step's check
        self._sampler.advance(len(indices))
        self._step_state["samples"] = indices
        if self._placed_run is not None:  # the replica's share: its pipeline stages all see it
            return GlobalSampler.split(indices, *self._placed_run.data_rank())
        return GlobalSampler.split(indices, self.rank, self.world_size)

    def next_batch(self, source: Iterable[Any] | Iterator[Any], *, resumable: bool | None = None) -> Any:
        """This rank's next batch from a data source that cannot be indexed.

        Live, the batch comes from ``source`` and is logged (every rank's part joins one global
        batch, stored once by content). While replaying, the logged batch is returned. A
        *resumable* source (one whose position snapshots hold: tracked with `track`, or any
        object with ``state_dict``) is advanced as well, so that it is at the right place when the
        run goes live, and what it yields is checked against the log; a stream that is not
        resumable (a queue, a socket) is not touched.
        """
        if resumable is None:
            resumable = any(source is obj for obj in self.tracked.values()) or hasattr(source, "state_dict")
        iterator = source if isinstance(source, Iterator) else iter(source)
        record = self._records.get(self.step + 1)
        if record is not None and record.batch is not None and self._contents is not None:
            if resumable:
                self._step_state["batch"] = codec.pack(next(iterator))
            global_batch, parts = codec.unpack(self._contents.blob(record.batch))
            return codec.part_of(global_batch, parts, self.rank, self.world_size)
        batch = next(iterator)
        self._step_state["batch"] = codec.pack(batch)
        return batch

    def capture_ops(self, step: int | None = None) -> None:
        """Capture the aten op stream of ``step`` (default: the next step); see `replay.ops`."""
        from moai_ckpt.opcapture import OpCaptureHooks

        if self._ops is None:
            self._ops = OpCaptureHooks()
        self._ops.request(self.step + 1 if step is None else step)

    def hparam(self, **values: float | int | bool) -> None:
        """Log extra scalars in force for the current step (e.g. ``accumulation=4``)."""
        self._user_hparams.update(values)

    def record(self, *, loss: float | torch.Tensor, grad_norm: float | torch.Tensor | None = None) -> None:
        """The current step's results (tensors are read without waiting for the device)."""
        self._step_state["loss"] = loss
        self._step_state["grad_norm"] = grad_norm

    def steps(self, total: int) -> Iterator[int]:
        """Step numbers to run, resuming after the last completed one (replaying logged steps first)."""
        self._start()
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        hooks = self._fault_hooks() if faults.active() else []
        try:
            if self.session is not None and self._target() == self.step:
                self._finish_session()
            for step in range(self.step + 1, total + 1):
                self._begin(step)
                yield step
                self._end(step)
            if self.replaying:
                self._replay_done()
            if self.snapshot_at_end and self.session is None:
                self._final_snapshot()
        finally:
            for handle in hooks:
                handle.remove()
            for s, handler in previous.items():
                signal.signal(s, handler)

    # -- start: restore, read the log ------------------------------------------------------------

    def _start(self) -> None:
        self._started = time.perf_counter()
        if self.session is None:
            # a live run writes snapshots and the log: take the run's writer lease before touching
            # either, so a second job on the same run fails now, naming the first
            self.ckpt.acquire()
        target = self._target_step_bound()
        steps = [s for s in self.ckpt.steps() if target is None or s <= target]
        latest = self.world.broadcast_json(steps[-1] if steps else None, "choosing the snapshot to resume")
        if latest is None:
            if self.session is not None:
                raise SnapshotNotFoundError("no committed snapshot to restore from", url=self.ckpt.url)
            latest = 0
            if 0 in log_bases(self.ckpt.storage):
                # the snapshot of step 0 is gone or its marker is damaged, but its log is there: the
                # training function has just built step 0's state, and replaying checks every step
                log.warning("the snapshot of step 0 is missing or damaged; replaying the log from the state built now")
                self._from_initial_state = True
                self._unusable.add(0)
            else:
                self.ckpt.run_entry = self.entry
                # the log needs a base: the initial state (over the leftovers of an interrupted first save)
                self.ckpt.save(0, self._state(), info=self._info(), overwrite=True)
        else:
            latest = self._restore_newest_usable([s for s in steps if s <= latest])
        if self.world.rank == 0:
            self._warn_skipped(latest, target)
        self.step = latest
        self._last_snapshot = time.monotonic()
        self._snapshot_step = latest
        restore_s = time.perf_counter() - self._started
        # a restore or verify session reads the log as it is; only a live run settles it
        writer, problem = self._open_log(latest) if self.world.rank == 0 and self.session is None else (None, None)
        self.world.barrier("resuming the log")
        contents = records_after(self.ckpt.storage, latest)  # rank 0 has settled it
        if problem is None and contents.corruption is not None:
            problem = str(contents.corruption)
        self._contents = contents
        usable = contents.records
        if self.session is not None:
            usable = [r for r in usable if r.step <= self._target()]
        self._records = {r.step: r for r in usable}
        placement = current_placement(self.world_size, self.device)
        if self._placed_run is not None:
            placement = Placement.model_validate({**placement.model_dump(), "plan": self._placed_run.label})
        changed = sorted(
            {d for r in usable for d in placement_changes(contents.placement(r.step) or placement, placement)}
        )
        strict = not changed and (self.session is None or self.session.mode == "restore")
        self.report = ReplayReport(
            base_step=latest,
            first_step=latest + 1,
            last_step=latest,
            logged_last_step=contents.last_step,
            strict=strict,
            placement_logged=contents.placement(usable[0].step) if usable else None,
            placement_now=placement,
            placement_changes=changed,
            log_problem=problem,
            from_initial_state=self._from_initial_state,
            rank_local=self._rank_local_restored(latest),
            restore_s=restore_s,
        )
        self._recorder = Recorder(
            self._log_world,
            writer,
            contents,
            strict=strict,
            names=[],
            sharded=[],
            flush_seconds=self.log_flush_seconds,
            exact=not changed,
        )
        self._recorder.done_step = latest
        self._placement = placement
        self._replay_started = time.perf_counter()
        if usable:
            log.info(
                "resumed from the snapshot of step %d in %.2f s; replaying steps %d..%d from the log%s",
                latest,
                restore_s,
                latest + 1,
                usable[-1].step,
                f" on a changed placement ({'; '.join(changed)}): drift is reported" if changed else "",
            )

    def _warn_skipped(self, restored: int, target: int | None) -> None:
        """Say which newer snapshots were passed over because their commit marker is damaged."""
        skipped = [e for e in self.ckpt.damaged_after(restored) if target is None or e.step <= target]
        if skipped:
            log.warning("%s", skipped_message(skipped, restored))

    def _restore_newest_usable(self, steps: list[int]) -> int:
        """Restore the newest snapshot that passes every check; older ones stand in for corrupt ones.

        A corrupt snapshot is never loaded: the run restores an older one and replays the log
        from there (the logs of later snapshots continue it). The corrupt ones are overwritten
        when the run next snapshots at their step.
        """
        problems = []
        for candidate in reversed(steps):
            try:
                state = self._state()
                self.ckpt.restore(state, step=candidate)
                for key, value in state.items():  # plain values are replaced in the mapping
                    if key in self.tracked and not isinstance(value, PartialState):
                        self.tracked[key] = value
            except (CorruptSnapshotError, UnsupportedFormatError, CoordinationError) as exc:
                if isinstance(exc, RankLostError):
                    raise
                problems.append(f"step {candidate}: {exc}")
                self._unusable.add(candidate)
                log.warning("the snapshot of step %d cannot be restored (%s); trying an older one", candidate, exc)
                continue
            if problems:
                log.warning("restored the snapshot of step %d instead of newer unusable ones: %s", candidate, problems)
            return candidate
        if 0 in log_bases(self.ckpt.storage):
            # the state at step 0 is what the training function itself builds, and the log holds
            # every step since: replaying them from the fresh objects checks each one, so an
            # initial state that differs from the original is reported, never silently used (the
            # snapshot of step 0 failed its checks, or its marker is damaged and it is not listed)
            self._unusable.add(0)
            log.warning(
                "no snapshot can be restored (%s); starting from the state the training function builds "
                "(step 0) and replaying the log from step 1",
                "; ".join(problems),
            )
            self._from_initial_state = True
            return 0
        raise CorruptSnapshotError("no committed snapshot could be restored: " + "; ".join(problems), url=self.ckpt.url)

    def _rank_local_restored(self, base: int) -> dict[str, str]:
        """Which copy of each rank-local array the restore of ``base`` took (for the replay report)."""
        restored = self.ckpt.last_restore
        if restored is None or restored.step != base or self._from_initial_state:
            return {}
        return restored.rank_local.summary()

    def _open_log(self, base: int) -> tuple[LogWriter, str | None]:
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
            storage, base, flush_every=self.log_flush_every, fence=self.ckpt.check_writer
        )
        if contents.last_step > resumed.last_step:  # the snapshot committed before its log moved over
            writer.copy([r for r in contents.records if r.step > resumed.last_step], contents)
        return writer, problem

    def _target(self) -> int:
        """The step a restore or verify session stops at."""
        assert self.session is not None and self._contents is not None
        last = self._contents.last_step
        if self.session.step is None:
            return last
        if self.session.step > last:
            raise SnapshotNotFoundError(
                f"step {self.session.step} is past the end of the log (step {last})", url=self.ckpt.url
            )
        return self.session.step

    def _target_step_bound(self) -> int | None:
        if self.session is not None and self.session.step is not None and self.session.step in self.session.capture_ops:
            return self.session.step - 1  # a captured step must run: restore a snapshot before it
        return self.session.step if self.session is not None else None

    # -- each step ------------------------------------------------------------------------------

    def log_stats(self) -> dict[str, float]:
        """Mean milliseconds per step the log costs: on the training thread (``step start``,
        ``step end``, ``waiting for the log``) and on the recorder's thread (its phases)."""
        out = {}
        steps = max(self._stats.get("steps", 0.0), 1.0)
        for name, total in self._stats.items():
            if name != "steps":
                out[f"training thread: {name}"] = 1e3 * total / steps
        if self._recorder is not None:
            rec = self._recorder.stats
            for name, total in rec.items():
                if name != "steps":
                    out[f"log thread: {name}"] = 1e3 * total / max(rec.get("steps", 0.0), 1.0)
        return out

    def _count(self, name: str, since: float) -> float:
        now = time.perf_counter()
        self._stats[name] = self._stats.get(name, 0.0) + now - since
        return now

    def _begin(self, step: int) -> None:
        started = time.perf_counter()
        faults.set_step(step)
        record = self._records.get(step)
        if record is None and self.replaying:
            self._replay_done()
        self.replaying = record is not None
        self._step_state = {"rng": rng_components()}
        self._user_hparams = {}
        if record is not None:
            mine = record.rng.get(f"rank{self.rank}", {})
            if mine and self._contents is not None:
                states = {gen: self._contents.blob(digest) for gen, digest in mine.items()}
                self._rng_skipped.update(load_rng_components(states))
                if self._from_initial_state and self.replayed == 0:
                    # rebuilt from scratch, the generators a job never seeds start anywhere: the
                    # logged states are what this step uses, and they are what is compared
                    self._step_state["rng"] = {**self._step_state["rng"], **states}
        self._step_state["hparams"] = Hyperparameters.capture(self.tracked)
        faults.point("step.begin")
        if self._ops is not None:
            self._ops.begin(self, step)
        self._count("step start", started)

    def _end(self, step: int) -> None:
        if self._ops is not None:
            self._ops.end(self, step, self._step_state)
        started = time.perf_counter()
        state = self._step_state
        if "loss" not in state:
            raise RuntimeError(f"step {step} ended without run.record(loss=...)")
        faults.point("step.end")
        if self._params is None:
            self._params = self._parameters()
            assert self._recorder is not None
            self._recorder.names, self._recorder.sharded = self._params[0], self._params[2]
            if self._recorder.writer is not None:
                self._recorder.install_header(self._recorder.writer, self._placement)
        hp: Hyperparameters = state["hparams"]
        for key, value in self._user_hparams.items():
            hp._add(key, value)
        work = StepWork(
            step=step,
            rng=state["rng"],
            hparams=hp.host,
            values=StepValues.capture(self._params[1], state["loss"], state["grad_norm"], hp),
            samples=state.get("samples"),
            batch=state.get("batch"),
            stop=self._stop_signal,
            snapshot_due=self.snapshot_every_s is not None
            and time.monotonic() - self._last_snapshot >= self.snapshot_every_s,
            state=capture_state(self._state()),
        )
        recorder = self._recorder
        assert recorder is not None
        recorder.submit(work)
        waiting = self._count("step end", started)
        recorder.wait(step - self.lag, timeout=2 * self.ckpt.options.collective_timeout_s)
        self._count("waiting for the log", waiting)
        self._stats["steps"] = self._stats.get("steps", 0.0) + 1
        if self.replaying:
            self.replayed += 1
        self.step = step
        if self.session is not None:
            if self.replaying and self.session.progress:
                report_progress(step, self._target(), self.rank)
            if step == self._target():
                self._finish_session()
        decision = recorder.decision(step - self.lag)
        self._maybe_settle_snapshot()
        # a timed snapshot is decided from the results of step - lag; one taken since then (the
        # steps after it were submitted before its clock reset) has already answered it
        timed = decision is not None and decision.snapshot and self._snapshot_step < step - self.lag
        if self._snapshot_due(step, timed):
            self._scheduled_snapshot(step)
        # one process stops after the step in progress; several agree on a step from the results
        # they all gathered (the step in progress or the next one)
        stop = self._stop_signal if self.world_size == 1 else decision.stop if decision is not None else None
        if stop is not None:
            self._emergency_stop(stop)

    def _scheduled_snapshot(self, step: int) -> None:
        """A snapshot on schedule; while replaying, only of a state its check found bitwise equal.

        On the placement that wrote the log, a replayed step that passed its check is the logged
        run's state: its snapshot lets the next restart skip the steps replayed so far (the log
        moves over with the records still to replay). On another placement the replayed state
        has drifted from what the later records describe, so the snapshot waits for the end of
        the replay. Restore and verify sessions write no snapshots while replaying.
        """
        if not self.replaying:
            self._snapshot(step)
        elif self.session is None and self.report is not None and self.report.strict:
            assert self._recorder is not None
            self._recorder.wait(step, timeout=2 * self.ckpt.options.collective_timeout_s)
            self._unusable.add(step)  # whatever is stored at a replayed step failed to restore: replace it
            self._snapshot(step)
        elif self.session is None:
            self._snapshot_after_replay = True

    def _replay_done(self) -> None:
        """The first live step is about to run: settle and report the replay."""
        assert self._recorder is not None and self.report is not None
        self._recorder.wait(self.step)
        self._seal_report()
        if self._snapshot_after_replay:  # one was due while replaying on a changed placement
            self._snapshot_after_replay = False
            self._unusable.add(self.step)  # as in `_scheduled_snapshot`
            self._snapshot(self.step)
        report = self.report
        if report.strict:
            log.info(
                "replayed %d steps in %.2f s: every step bitwise equal to the log", report.replayed, report.replay_s
            )
        else:
            drift = report.max_drift()
            log.warning(
                "replayed %d steps on a changed placement (%s) in %.2f s; largest drift: loss %.3g, "
                "grad norm %.3g, parameter norm %.3g (relative)",
                report.replayed,
                "; ".join(report.placement_changes),
                report.replay_s,
                drift["loss_rel"],
                drift["grad_norm_rel"],
                drift["state_rel"],
            )
        self._write_report()

    def _seal_report(self) -> None:
        assert self._recorder is not None and self.report is not None
        self.report.steps = list(self._recorder.checks)
        self.report.last_step = self.report.base_step + len(self.report.steps)
        self.report.replay_s = time.perf_counter() - self._replay_started
        self.report.rng_not_restored = sorted(self._rng_skipped)

    def _write_report(self) -> None:
        if self.rank != 0 or self.report is None or not self.report.steps:
            return
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        key = replay_report_key(stamp, self.report.base_step)
        try:
            self.ckpt.storage.write(key, self.report.model_dump_json(indent=1).encode())
        except MoaiCkptError as exc:  # a report is worth a warning, not the run
            log.warning("could not write the replay report %s: %s", key, exc)

    # -- snapshots, signals, sessions -----------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        """What a snapshot holds: the tracked objects, a placed model and its optimizer by
        whole-model parameter names (so another plan's ranks each read their own stage)."""
        if self._placed_run is None:
            return dict(self.tracked)
        return self._placed_run.snapshot_state(self.tracked)

    def _info(self) -> dict[str, Any] | None:
        """What a snapshot's manifest records besides the state: the plan it was taken under."""
        return self._placed_run.info() if self._placed_run is not None else None

    def _parameters(self) -> tuple[list[str], list[torch.Tensor], list[bool]]:
        """The parameters whose norms the log records (the whole model's when placed)."""
        if self._placed_run is not None:
            stage = self._placed_run.placed.stage_module
            key = next((k for k, v in self.tracked.items() if v is stage or v is self._placed_run.placed.module), None)
            if key is not None:
                return self._placed_run.parameters(key)
        return parameters_of(self.tracked)

    def _snapshot_due(self, step: int, timed: bool) -> bool:
        return timed or (self.snapshot_every is not None and step % self.snapshot_every == 0)

    def _snapshot(self, step: int) -> None:
        self._last_snapshot = time.monotonic()
        self._snapshot_step = step
        overwrite = step in self._unusable
        if self.async_snapshots:
            self._settle_snapshot()
            self._pending = (step, self.ckpt.save_async(step, self._state(), overwrite=overwrite, info=self._info()))
            return
        try:
            self.ckpt.save(step, self._state(), overwrite=overwrite, info=self._info())
        except _SNAPSHOT_FAILURES as exc:
            self._snapshot_failed(step, exc)
            return
        self._rebase(step)

    def _final_snapshot(self) -> None:
        """The last step of the loop is snapshotted: the finished run's state is a snapshot."""
        assert self._recorder is not None
        self._recorder.drain()
        self._settle_snapshot()
        if self.ckpt.latest_step() != self.step:
            try:
                self.ckpt.save(self.step, self._state(), overwrite=self.step in self._unusable, info=self._info())
            except _SNAPSHOT_FAILURES as exc:
                self._snapshot_failed(self.step, exc)
                return
            self._rebase(self.step)

    def _snapshot_failed(self, step: int, exc: Exception) -> None:
        """A snapshot that could not be written is not fatal: the log goes on from the last one.

        Every rank gets here together: the rank whose storage failed with its own error, the
        others with the `CoordinationError` that names it. A rank that died is another matter
        (`RankLostError`): that propagates and ends the job.
        """
        if isinstance(exc, RankLostError):
            raise exc
        self.snapshot_failures += 1
        log.warning("the snapshot of step %d failed and is skipped (the log continues): %s", step, exc)

    def _maybe_settle_snapshot(self) -> None:
        if self._pending is not None and self._pending[1] is not None and self._pending[1].done():
            self._settle_snapshot()

    def _settle_snapshot(self) -> None:
        if self._pending is None:
            return
        step, handle = self._pending
        self._pending = None
        try:
            handle.result()
        except _SNAPSHOT_FAILURES as exc:
            self._snapshot_failed(step, exc)
            return
        self._unusable.discard(step)
        self._rebase(step)

    def _rebase(self, base: int) -> None:
        assert self._recorder is not None
        self._recorder.rebase(base)

    def _emergency_stop(self, signum: int) -> None:
        assert self._recorder is not None
        self._recorder.drain()
        self._settle_snapshot()
        if self.ckpt.latest_step() != self.step:
            self.ckpt.save(self.step, self._state(), info=self._info())
        log.warning("signal %s: snapshot of step %d taken, log flushed; exiting", signum, self.step)
        raise SystemExit(128 + signum)

    def _finish_session(self) -> None:
        """Restore / verify session: the target step is reached. Commit it (restore), report, stop."""
        assert self.session is not None and self._recorder is not None and self.report is not None
        self._recorder.drain()
        self._seal_report()
        if self.session.mode == "restore":
            started = time.perf_counter()
            target = Checkpointer(self.session.to, **self._ckpt_options()) if self.session.to else self.ckpt
            try:
                copy_info = self.session.to and self.rank == 0 and not target.storage.exists(RUN_INFO)
                if copy_info and self.ckpt.storage.exists(RUN_INFO):
                    target.storage.write(RUN_INFO, self.ckpt.storage.read_record(RUN_INFO))
                if target.latest_step() != self.step or self.session.to:
                    target.save(self.step, self._state(), overwrite=bool(self.session.to), info=self._info())
            finally:
                if target is not self.ckpt:
                    target.close()
            self.report.snapshot_s = time.perf_counter() - started
        if self.rank == 0 and self.session.report:
            with open(self.session.report, "w") as f:
                f.write(self.report.model_dump_json(indent=1))
        raise RestoreComplete(self.report)

    def _ckpt_options(self) -> dict[str, Any]:
        return {"collective_timeout_s": self.ckpt.options.collective_timeout_s}

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._stop_signal = signum

    def _fault_hooks(self) -> list[Any]:
        """Fault points in the user's forward, backward and optimizer step (chaos testing)."""
        handles = []
        for obj in self.tracked.values():
            if isinstance(obj, torch.nn.Module):
                handles.append(obj.register_forward_pre_hook(lambda *_: faults.point("forward")))
                handles.append(obj.register_full_backward_pre_hook(lambda *_: faults.point("backward")))
            elif isinstance(obj, torch.optim.Optimizer):
                handles.append(obj.register_step_pre_hook(lambda *_: faults.point("optimizer")))
        return handles

    def close(self, *, failing: bool = False) -> None:
        """Flush the log and finish the snapshot in flight (called by `fault_tolerant`).

        With ``failing`` (an exception is on its way out) problems are logged, not raised.
        """
        if self._ops is not None:
            self._ops.abandon()
        try:
            if self._recorder is not None and self._recorder.error is None:
                self._recorder.drain(timeout=2 * self.ckpt.options.collective_timeout_s)
            self._settle_snapshot()
        except Exception:
            if not failing:
                raise
            log.exception("while closing the run after an error")
        finally:
            if self._recorder is not None:
                self._recorder.close()
            self.ckpt.close()
            self.world.close()
            self._log_world.close()


def placement_changes(logged: Placement, now: Placement) -> list[str]:
    """What differs between the placement a log was written on and this one, plan included."""
    changes = logged.differences(now)
    before, after = (logged.model_extra or {}).get("plan"), (now.model_extra or {}).get("plan")
    if before != after and (before is not None or after is not None):
        changes.append(f"plan: {before or 'none'} -> {after or 'none'}")
    return changes


def quarantine(storage: Any, base: int, last_good: int) -> None:
    """Move the segments of ``log/<base>`` from the damaged one on aside, keeping the good records.

    The segments are copied under ``log/quarantine/<base>/`` (for a post-mortem), then deleted;
    the valid records of a damaged segment are rewritten first, as after a torn tail.
    """
    from replay.log import read_log, segments

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


def _storage_url(storage: str, kwargs: dict[str, Any]) -> str:
    """``storage`` with its ``{name}`` fields filled from the call's keyword arguments."""
    try:
        return storage.format(**kwargs) if "{" in storage else storage
    except (KeyError, IndexError) as exc:
        raise TypeError(f"fault_tolerant(storage={storage!r}) needs the keyword argument {exc} in the call") from None


def fault_tolerant(
    storage: str,
    *,
    snapshot_every: int | None = 100,
    snapshot_every_s: float | None = None,
    async_snapshots: bool = True,
    log_flush_every: int = 1,
    log_flush_seconds: float | None = None,
    log_sync: bool = False,
    log_lag: int = 1,
    snapshot_at_end: bool = True,
    deterministic: bool = False,
    capture_ops: str = "on_divergence",
    record_args: Iterable[str] | None = None,
    **options: Any,
) -> Callable[[Callable[..., R]], Callable[..., R]]:
    """Make a training function resumable at its last completed step (see the module docstring).

    Args:
        storage: the run directory (any fsspec URL). ``{name}`` fields are filled from the keyword
            arguments of the call (``storage="{run_dir}"`` with ``train(run_dir="runs/7")``).
        snapshot_every: steps between snapshots (None: only ``snapshot_every_s``).
        snapshot_every_s: also snapshot once this many seconds have passed since the last one
            (rank 0's clock decides, so every rank snapshots at the same step).
        async_snapshots: take snapshots with `Checkpointer.save_async`.
        log_flush_every: log records per durable segment (1: a segment per step).
        log_flush_seconds: with ``log_flush_every > 1``, a group is never older than this.
        log_sync: make each step's record durable before the next step starts.
        log_lag: otherwise, a step's record is durable before the ``log_lag``-th step after it
            completes (default 1: before the next step completes), so logging overlaps training;
            a crash re-runs at most ``log_lag`` completed steps, bitwise the same.
        snapshot_at_end: snapshot the last step when the loop of `Run.steps` finishes.
        deterministic: ``torch.use_deterministic_algorithms(True)`` and the environment it needs.
        capture_ops: when to capture a step's aten op stream: ``"never"``, ``"on_divergence"`` (a
            replay that diverges re-runs its step under capture) or ``"after_snapshot"`` (also the
            first step after each snapshot); see `moai_ckpt.opcapture` and docs/ops.md.
        record_args: the names of the arguments ``run.json`` records, as an allow-list (their
            values as given). By default every JSON-able argument is recorded except those whose
            name looks secret (``api_key``, ``hf_token``, ``password``...), which are recorded as
            "not recorded" markers; ``sys.argv`` is never recorded. See docs/security.md.
        **options: `Checkpointer` options and storage options.
    """
    if snapshot_every is not None and snapshot_every < 1:
        raise ValueError("snapshot_every must be at least 1 (or None)")
    if snapshot_every is None and snapshot_every_s is None:
        raise ValueError("set snapshot_every, snapshot_every_s or both")
    if snapshot_every_s is not None and snapshot_every_s <= 0:
        raise ValueError("snapshot_every_s must be positive")
    if isinstance(record_args, str) or not all(isinstance(n, str) for n in record_args or ()):
        raise TypeError(f"record_args must be a collection of argument names, got {record_args!r}")
    allowed = frozenset(record_args) if record_args is not None else None

    def wrap(fn: Callable[..., R]) -> Callable[..., R]:
        @functools.wraps(fn)
        def runner(*args: Any, **kwargs: Any) -> R:
            if deterministic:
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
                torch.use_deterministic_algorithms(True)
            run = Run(
                _storage_url(storage, kwargs),
                snapshot_every=snapshot_every,
                snapshot_every_s=snapshot_every_s,
                async_snapshots=async_snapshots,
                log_flush_every=log_flush_every,
                log_flush_seconds=log_flush_seconds,
                log_sync=log_sync,
                log_lag=log_lag,
                snapshot_at_end=snapshot_at_end,
                capture_ops=capture_ops,
                **options,
            )
            run.entry = record_call(fn, args, kwargs, allowed)
            try:
                result = fn(run, *args, **kwargs)
            except RestoreComplete as done:
                run.close()
                return done.report
            except ReplayDivergenceError as exc:
                if run.capture_policy != "never" and exc.check is not None:
                    # the capture re-runs this process's own function and call, never run.json's
                    label = capture_divergence(run, exc.check.step, function_spec(fn), args, kwargs)
                    if label is not None and hasattr(exc, "add_note"):
                        exc.add_note(f"op capture of the diverged step: {label} (moai-ckpt diff-ops)")
                run.close(failing=True)
                raise
            except BaseException:
                run.close(failing=True)
                raise
            run.close()
            return result

        runner.__wrapped_storage__ = storage  # type: ignore[attr-defined]
        return runner

    return wrap
