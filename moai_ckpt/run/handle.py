"""`Run`: the handle a fault-tolerant training loop holds, and the owner of its invariants.

A `Run` is built from `RunOptions` and holds one collaborator per job: the mode it runs in
(`session.Live` or `session.Offline`), what it tracks (`tracked.Tracked`), the resumption
(`resume.Resumption`), the step cycle (`step.StepCycle`), the snapshot scheduler
(`snapshots.SnapshotScheduler`) and, when asked for, the op capture. Its public methods check the
order of calls and hand the work over.

Two ways to drive it:

- ``for step in run.steps(total)``: the run owns the loop (what `fault_tolerant` hands a training
  function); SIGTERM and SIGINT take a snapshot and exit.
- `start`, then `begin_step` / `end_step` around each step, then `finish` and `close`: a loop
  someone else owns (the Lightning and Hugging Face integrations). No signal handler is
  installed; a snapshot decided at the end of step S is taken when step S+1 begins (or at
  `finish`), so that what the caller does between steps is in it, and a restored run's RNG
  states are set again when its first step begins.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Iterable, Iterator
from datetime import timedelta
from typing import TYPE_CHECKING, Any, NoReturn

import torch

from moai_ckpt import faults
from moai_ckpt.checkpointer import Checkpointer
from moai_ckpt.distributed import World, current_world
from moai_ckpt.errors import MoaiCkptError
from moai_ckpt.events import EventHook
from moai_ckpt.opcapture import OpCaptureHooks, hooks_for
from moai_ckpt.pruning import RunRetention
from moai_ckpt.run import report as replay_report
from moai_ckpt.run.options import RunOptions
from moai_ckpt.run.phases import RecoveryClock
from moai_ckpt.run.resume import RestorePoint, Resumption
from moai_ckpt.run.session import DEVICE_ENV, Completion, mode_from_env
from moai_ckpt.run.snapshots import SnapshotScheduler
from moai_ckpt.run.step import StepCycle, StepState
from moai_ckpt.run.tracked import Tracked
from moai_ckpt.sampler import GlobalSampler
from moai_ckpt.storage import Storage
from replay import codec
from replay.check import ReplayReport
from replay.log import Placement
from replay.stepstate import load_rng_components, rng_components

if TYPE_CHECKING:
    from parallel.apply import LossFn, Placed
    from parallel.costmodel import ModelProfile, ProfileOptions
    from parallel.inventory import Device
    from parallel.planner import PlanOptions

log = logging.getLogger("moai_ckpt.run")

__all__ = ["Run"]


class Run:
    """A fault-tolerant run: what a `fault_tolerant` training function receives, or a loop drives.

    Args:
        storage: the run directory (any fsspec URL); overrides ``options.storage``.
        options: the run's `RunOptions`; without it, ``**kwargs`` build one (`RunOptions.of`:
            run options, `Checkpointer` options and storage options, over the environment and
            the config file).
        device: where this rank's model lives (default: `device`'s choice).
        on_event: a hook (or several) called with each `moai_ckpt.events.Event` of the run:
            snapshots, the restore, the replay, log flushes.
    """

    def __init__(
        self,
        storage: str | None = None,
        *,
        options: RunOptions | None = None,
        device: torch.device | str | None = None,
        on_event: EventHook | Iterable[EventHook] | None = None,
        **kwargs: Any,
    ) -> None:
        self.options = options = RunOptions.from_call("Run", storage, options, kwargs)
        self._mode = mode_from_env()
        url = self._mode.storage_url(options.storage)
        self.ckpt = Checkpointer(url, options=options.checkpointer, on_event=on_event, **options.storage_options)
        self._ops: OpCaptureHooks | None = hooks_for(options.capture_ops, self._mode.capture_steps())
        timeout = timedelta(seconds=self.ckpt.options.collective_timeout_s)
        self.world: World = current_world(timeout)  # agreement on the training thread
        self._log_world: World = current_world(timeout)  # the recorder thread's own group
        self._device = torch.device(device) if device is not None else None
        self._tracked = Tracked()
        self._sampler: GlobalSampler | None = None
        self._snapshots = SnapshotScheduler(
            self.ckpt, self._tracked, options, writes=self._mode.writes, world=self.world
        )
        if options.keep and self._mode.writes and self.world.rank == 0:
            self._snapshots.retention = RunRetention(self.ckpt, options.keep)
        self._resumption = Resumption(
            self.ckpt, self.world, self._log_world, self._mode, self._tracked, options, self._snapshots.unusable
        )
        self._point: RestorePoint | None = None  # where the run resumed (set by start)
        self._cycle: StepCycle | None = None  # the steps after the base (once the log is open)
        self._stop_at: int | None = None  # a session's target step
        self._resume_rng: dict[str, bytes] | None = None  # set again when the first driven step begins
        self._closed = False
        self._live_reported = False  # the restart's report is written once live training begins
        self._clock = RecoveryClock()  # the phases of a restart: its marks start now
        self.report: ReplayReport | None = None
        #: what ``run.json`` records of the training function (set by `fault_tolerant`)
        self.entry: dict[str, Any] | None = None

    # -- where the run is ------------------------------------------------------------------------

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
        if self._device is not None:
            return self._device
        wanted = os.environ.get(DEVICE_ENV)
        if wanted == "cpu" or (wanted is None and not torch.cuda.is_available()):
            return torch.device("cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % max(torch.cuda.device_count(), 1))

    @property
    def storage(self) -> Storage:
        return self.ckpt.storage

    @property
    def url(self) -> str:
        return self.ckpt.url

    @property
    def collective_timeout_s(self) -> float:
        return self.ckpt.options.collective_timeout_s

    @property
    def tracked(self) -> dict[str, Any]:
        """The tracked objects, by name."""
        return self._tracked.objects

    @property
    def step(self) -> int:
        """The last completed step."""
        return self._cycle.step if self._cycle is not None else 0

    @property
    def replaying(self) -> bool:
        """Whether the step in progress re-runs a logged step (skip side effects)."""
        return self._cycle is not None and self._cycle.replaying

    @property
    def replayed(self) -> int:
        """How many logged steps this run replayed."""
        return self._cycle.replayed if self._cycle is not None else 0

    @property
    def snapshot_failures(self) -> int:
        """Snapshots that failed on storage and were skipped (the log went on)."""
        return self._snapshots.failures

    @property
    def log_placement(self) -> Placement | None:
        return self._cycle.placement if self._cycle is not None else None

    @property
    def snapshot_mark(self) -> int:
        return self._snapshots.mark

    def restorable_steps(self) -> list[int]:
        return self._resumption.restorable_steps()

    # -- what the training function uses -------------------------------------------------------

    def track(self, **objects: Any) -> None:
        """Objects whose state is snapshotted (modules, optimizers, schedulers, extras...).

        Raises:
            NotResumableError: an object keeps state no snapshot can hold, so a resumed run would
                silently differ (e.g. a data loader whose workers draw random augmentation from
                generators it does not save); the message says what to do instead. Nothing is
                tracked then.
        """
        self._tracked.add(objects)
        if self.options.async_snapshots and self._mode.writes:
            self.ckpt.start_writer()  # with persist="process": started now, up before the first snapshot

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
        if self._point is not None:
            raise RuntimeError("call run.place(...) before run.steps(): the restore needs the placement")
        from moai_ckpt.placement import place  # the planner's imports are paid by placed runs only

        placement = place(
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
        self._tracked.placement = placement
        return placement.placed

    @property
    def plan(self) -> Any | None:
        """The `parallel.Plan` the run is placed with (None before `place`)."""
        return self._tracked.placement.plan if self._tracked.placement is not None else None

    def sampler(self, num_samples: int, global_batch_size: int, **options: Any) -> GlobalSampler:
        """The run's data position: a `GlobalSampler`, snapshotted with the state."""
        self._sampler = GlobalSampler(num_samples, global_batch_size, **options)
        self._tracked.objects["_data"] = self._sampler
        return self._sampler

    def batch(self) -> list[int]:
        """This rank's sample indices for the current step (the logged ones while replaying)."""
        if self._sampler is None:
            raise RuntimeError("call run.sampler(...) before run.batch()")
        state = self._current("run.batch()")
        indices = self._sampler.global_batch()
        if state.record is not None and state.record.samples is not None:
            indices = state.record.samples  # a mismatch with the sampler is reported by the step's check
        self._sampler.advance(len(indices))
        state.samples = indices
        return self._tracked.share(indices, self.rank, self.world_size)

    def next_batch(self, source: Iterable[Any] | Iterator[Any], *, resumable: bool | None = None) -> Any:
        """This rank's next batch from a data source that cannot be indexed.

        Live, the batch comes from ``source`` and is logged (every rank's part joins one global
        batch, stored once by content). While replaying, the logged batch is returned. A
        *resumable* source (one whose position snapshots hold: tracked with `track`, or any
        object with ``state_dict``) is advanced as well, so that it is at the right place when the
        run goes live, and what it yields is checked against the log; a stream that is not
        resumable (a queue, a socket) is not touched.
        """
        state = self._current("run.next_batch()")
        if resumable is None:
            resumable = any(source is obj for obj in self.tracked.values()) or hasattr(source, "state_dict")
        iterator = source if isinstance(source, Iterator) else iter(source)
        record = state.record
        if record is not None and record.batch is not None and self._cycle is not None:
            if resumable:
                state.batch = codec.pack(next(iterator))
            global_batch, parts = codec.unpack(self._cycle.contents.blob(record.batch))
            return codec.part_of(global_batch, parts, self.rank, self.world_size)
        batch = next(iterator)
        state.batch = codec.pack(batch)
        return batch

    def capture_ops(self, step: int | None = None) -> None:
        """Capture the aten op stream of ``step`` (default: the next step); see `replay.ops`."""
        if self._ops is None:
            self._ops = OpCaptureHooks()
        self._ops.request(self.step + 1 if step is None else step)

    def hparam(self, **values: float | int | bool) -> None:
        """Log extra scalars in force for the current step (e.g. ``accumulation=4``)."""
        self._current("run.hparam()").extra_hparams.update(values)

    def record(self, *, loss: float | torch.Tensor, grad_norm: float | torch.Tensor | None = None) -> None:
        """The current step's results (tensors are read without waiting for the device)."""
        self._current("run.record()").record_results(loss, grad_norm)

    def log_stats(self) -> dict[str, float]:
        """Mean milliseconds per step the log costs: on the training thread (``step start``,
        ``step end``, ``waiting for the log``) and on the recorder's thread (its phases)."""
        return self._cycle.log_stats() if self._cycle is not None else {}

    def _current(self, what: str) -> StepState:
        state = self._cycle.current if self._cycle is not None else None
        if state is None:
            raise RuntimeError(
                f"{what} belongs inside a step (a step of run.steps(), or between begin_step and end_step)"
            )
        return state

    # -- the loop --------------------------------------------------------------------------------

    def steps(self, total: int) -> Iterator[int]:
        """Step numbers to run, resuming after the last completed one (replaying logged steps first)."""
        self._start(driven=False)
        previous = {s: signal.signal(s, self._snapshots.preemption.on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        hooks = self._tracked.fault_hooks() if faults.active() else []
        try:
            for step in range(self.step + 1, total + 1):
                self.begin_step(step)
                yield step
                self.end_step(step)
            self.finish()
        finally:
            for handle in hooks:
                handle.remove()
            for s, handler in previous.items():
                signal.signal(s, handler)

    def start(self) -> int | None:
        """Join the run for a loop you drive (collective): restore the newest usable snapshot.

        Track everything first. Then call `begin_step` and `end_step` around each step, `finish`
        at the end and `close` in any case. A new run takes its first snapshot (the base of its
        log) when its first step begins.

        Returns:
            The step the run resumes after (its log replays from the next one), or None for a new run.
        """
        self._start(driven=True)
        assert self._point is not None
        return self._point.base

    def _start(self, *, driven: bool) -> None:
        if self._point is not None:
            raise RuntimeError("the run has started already")
        self._snapshots.defer = driven
        self._clock.restore_begins()
        point = self._point = self._resumption.restore()
        self._clock.restore_ends()
        self._clock.saw(point.last_seen)
        self._snapshots.local = self._resumption.open_local() if point.base is not None else None
        if point.base is None and not driven:
            self._take_base(0)
        if point.base is None:
            return  # a driven new run: the base is taken when its first step begins
        if driven and not point.from_initial_state:
            self._resume_rng = rng_components()  # what the restore set (see the module docstring)
        self._open_log()

    def _take_base(self, step: int) -> None:
        """A new run: the state now is the base of its log."""
        assert self._point is not None
        started = time.perf_counter()
        self._snapshots.base(step, self.entry)
        self._point.base = step
        self._point.restore_s += time.perf_counter() - started
        self._snapshots.local = self._resumption.open_local()  # the run's run.json exists now

    def _open_log(self) -> None:
        assert self._point is not None
        opened = self._resumption.open_log(self._point, self.device)
        self.report = opened.report
        self._stop_at = opened.stop
        if opened.contents.records:
            self._clock.saw(opened.contents.records[-1].wall_time)
        self._cycle = StepCycle(
            opened,
            rank=self.rank,
            lag=self.options.lag,
            timeout_s=2 * self.collective_timeout_s,
            from_initial_state=self._point.from_initial_state,
            state_digests=self.options.state_digests,
        )
        self._snapshots.restored(opened.base, opened.recorder)
        if self._stop_at == opened.base:
            self._complete()

    def begin_step(self, step: int, samples: list[int] | None = None) -> None:
        """Step ``step`` begins: a deferred snapshot is taken, the step's inputs are captured.

        Args:
            step: the step about to run (the last completed one plus one).
            samples: the global sample indices of its batch (or set them with `batch`).

        Raises:
            MoaiCkptError: ``step`` does not follow the last completed step.
        """
        started = time.perf_counter()
        if self._point is None:
            raise RuntimeError("call run.start() (or iterate run.steps()) before begin_step")
        if self._cycle is None:  # a driven new run: the state now is the base of the log
            self._take_base(step - 1)
            self._open_log()
        cycle = self._cycle
        assert cycle is not None
        if step != cycle.step + 1:
            raise MoaiCkptError(
                f"step {step} begins after step {cycle.step}: the loop's step count and the run's disagree",
                url=self.url,
                step=step,
            )
        self._snapshots.at_boundary()
        self._set_resumed_rng()
        faults.set_step(step)
        if cycle.logged(step) is None and cycle.replaying:
            self._replay_done()
        elif cycle.logged(step) is None and not self._live_reported:
            self._live()
        cycle.begin(step, self.tracked, samples)
        faults.point("step.begin")
        if self._ops is not None:
            self._ops.begin(self, step)
        cycle.count("step start", started)

    def end_step(
        self, step: int, loss: float | torch.Tensor | None = None, grad_norm: float | torch.Tensor | None = None
    ) -> None:
        """Step ``step`` completed: its record is logged (or checked against the log, on a replay).

        Args:
            step: the step that began last.
            loss: its loss (None: as given to `record`).
            grad_norm: its gradient norm.

        Raises:
            ReplayDivergenceError: a replayed step differs from its record on the placement that wrote it.
        """
        state = self._current("end_step")
        if state.step != step:
            raise MoaiCkptError(f"step {step} ends, but step {state.step} began", url=self.url, step=step)
        if loss is not None:
            state.record_results(loss, grad_norm)
        if self._ops is not None:
            self._ops.end(self, step, state.loss, state.grad_norm)
        cycle = self._cycle
        assert cycle is not None and self.report is not None
        decision = cycle.end(
            state,
            parameters=self._tracked.parameters,
            snapshot_state=self._tracked.snapshot_state,
            stop=self._snapshots.preemption.received,
            snapshot_due=self._snapshots.clock_due(),
        )
        if self._stop_at is not None:
            if cycle.replaying:
                self._mode.progress(step, self._stop_at, self.rank)
            if step == self._stop_at:
                self._complete()
        stop = self._snapshots.after_step(
            step, decision, replaying=cycle.replaying, strict=self.report.strict, world_size=self.world_size
        )
        if stop is not None:
            self._emergency_stop(stop)

    def finish(self) -> ReplayReport | None:
        """The loop ended: report a replay that ran to the end, and snapshot the last step.

        Returns:
            The replay report (None when the run never opened its log).
        """
        self._set_resumed_rng()  # restored, and no step left to run: the RNG is the snapshot's
        cycle = self._cycle
        if cycle is None:
            return self.report
        self._snapshots.at_boundary()
        if cycle.replaying:
            self._replay_done()
        elif not self._live_reported:
            self._live()
        if self.options.snapshot_at_end and self._mode.writes:
            self._snapshots.final(cycle.step)
        return self.report

    def close(self, *, failing: bool = False) -> None:
        """Flush the log, finish the snapshot in flight, release threads and process groups.

        With ``failing`` (an exception is on its way out) problems are logged, not raised.
        Closing twice does nothing.
        """
        if self._closed:
            return
        self._closed = True
        if self._ops is not None:
            self._ops.abandon()
        recorder = self._cycle.recorder if self._cycle is not None else None
        try:
            if recorder is not None and recorder.error is None:
                recorder.drain(timeout=2 * self.collective_timeout_s)
            self._snapshots.settle()
            self._snapshots.settle_local()
        except Exception:
            if not failing:
                raise
            log.exception("while closing the run after an error")
        finally:
            if self._cycle is not None:
                self._cycle.close()
            if recorder is not None:
                recorder.close()
            if self._snapshots.retention is not None:
                self._snapshots.retention.close()
            self.ckpt.close()
            self.world.close()
            self._log_world.close()

    # -- the ends of a replay, a session, a job --------------------------------------------------

    def _set_resumed_rng(self) -> None:
        if self._resume_rng is not None:
            load_rng_components(self._resume_rng)
            self._resume_rng = None

    def _replay_done(self) -> None:
        """The replayed steps are over: settle and report the replay (rank 0 writes the report)."""
        cycle = self._cycle
        assert cycle is not None and self.report is not None
        cycle.recorder.wait(cycle.step, timeout=2 * self.collective_timeout_s)
        self._seal_report(cycle)
        cycle.replaying = False
        self._snapshots.replay_done(cycle.step)
        replay_report.announce(self.report)
        self._live()

    def _live(self) -> None:
        """Training goes live: a restart's phases join its report, which rank 0 writes."""
        self._live_reported = True
        point, report = self._point, self.report
        if point is None or report is None or not point.restarted:
            return  # a new run: nothing was recovered
        tier = "none: step 0 rebuilt" if point.from_initial_state else point.tier
        report.recovery = self._clock.phases(
            tier=tier, restore_bytes=point.nbytes, replayed=report.replayed, replay_s=report.replay_s
        )
        replay_report.phases(report.recovery)
        if self.rank == 0:
            replay_report.write(self.storage, report)

    def _seal_report(self, cycle: StepCycle) -> None:
        assert self.report is not None
        replay_s = time.perf_counter() - cycle.replay_started
        replay_report.seal(self.report, cycle.recorder.checks, replay_s, cycle.rng_skipped)
        if cycle.replayed:
            self.ckpt.events.emit("replay", cycle.step, replay_s, stall_s=replay_s, steps=cycle.replayed)

    def _complete(self) -> NoReturn:
        """A session reached its target step: commit or report, then leave the loop (`RestoreComplete`)."""
        cycle = self._cycle
        assert cycle is not None and self.report is not None
        cycle.recorder.drain()
        self._seal_report(cycle)
        done = Completion(
            self.ckpt, cycle.step, self._tracked.snapshot_state, self._tracked.snapshot_info(), self.report, self.rank
        )
        self._mode.complete(done)

    def _emergency_stop(self, signum: int) -> NoReturn:
        assert self._cycle is not None
        self._cycle.recorder.drain()
        self._snapshots.emergency(self._cycle.step)
        log.warning("signal %s: snapshot of step %d taken, log flushed; exiting", signum, self._cycle.step)
        raise SystemExit(128 + signum)
