"""Step log, replay check and snapshots for a training loop that a framework drives.

`moai_ckpt.fault_tolerant` owns its loop; Lightning and the Hugging Face `Trainer` own theirs and
call back at step boundaries. `StepDriver` gives those callbacks the machinery of `moai_ckpt.run`,
built from the same parts: `Checkpointer` snapshots, the op-stream log (`replay.log`), the
background `Recorder` that writes each step's record (or checks a replayed step against it) and
the `ReplayReport`::

    driver = StepDriver(url, snapshot_every=100)
    driver.open(tracked, device)   # collective: restore the newest usable snapshot, if any
    for each step:
        driver.begin(step, samples)          # RNG states, hyperparameters, global sample indices
        ...                                  # the framework runs the step
        driver.end(step, loss, grad_norm)    # logged, or checked against the log (a replay)
    driver.finish()                          # last snapshot, log flushed, replay report
    driver.close()

A snapshot decided at the end of step S is taken when step S+1 begins (or at `finish`): the
frameworks do work between steps (epoch ends, schedulers, their own callbacks, a new data
iterator that draws from the RNG), and the state a resumed run must continue from is the state
right before step S+1 starts, RNG included. For the same reason, after a restore the RNG states
of the snapshot are set again when the first step begins.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import torch

from moai_ckpt.checkpointer import Checkpointer
from moai_ckpt.distributed import CoordinationError, RankLostError, World, current_world
from moai_ckpt.errors import CorruptSnapshotError, MoaiCkptError, StorageError
from moai_ckpt.layout import replay_report_key
from moai_ckpt.results import SaveHandle
from moai_ckpt.run import current_placement, placement_changes, quarantine
from replay.check import ReplayReport
from replay.log import LogContents, LogWriter, Placement, StepRecord, log_bases, records_after
from replay.recorder import Recorder, StepWork
from replay.stepstate import Hyperparameters, StepValues, load_rng_components, parameters_of, rng_components

log = logging.getLogger("moai_ckpt.integrations")
_SNAPSHOT_FAILURES = (StorageError, CorruptSnapshotError, CoordinationError)


class StepDriver:
    """One run directory's snapshots, step log and replay, driven from a framework's hooks.

    Args:
        url: the run directory (any fsspec URL).
        snapshot_every: steps between snapshots (None: only ``snapshot_every_s``).
        snapshot_every_s: also snapshot once this many seconds have passed (rank 0's clock).
        async_snapshots: write snapshots in the background (`Checkpointer.save_async`).
        snapshot_at_end: snapshot the last completed step when training finishes.
        log_flush_every: log records per durable segment.
        log_flush_seconds: with ``log_flush_every > 1``, a group is never older than this.
        log_lag: a step's record is durable before the ``log_lag``-th step after it completes
            (0: before the next step starts).
        **options: `Checkpointer` options and storage options.
    """

    def __init__(
        self,
        url: str,
        *,
        snapshot_every: int | None = 100,
        snapshot_every_s: float | None = None,
        async_snapshots: bool = True,
        snapshot_at_end: bool = True,
        log_flush_every: int = 1,
        log_flush_seconds: float | None = None,
        log_lag: int = 1,
        **options: Any,
    ) -> None:
        if snapshot_every is not None and snapshot_every < 1:
            raise ValueError("snapshot_every must be at least 1 (or None)")
        if snapshot_every is None and snapshot_every_s is None:
            raise ValueError("set snapshot_every, snapshot_every_s or both")
        if log_lag < 0:
            raise ValueError("log_lag must be 0 or more")
        self.url = url
        self.snapshot_every = snapshot_every
        self.snapshot_every_s = snapshot_every_s
        self.async_snapshots = async_snapshots
        self.snapshot_at_end = snapshot_at_end
        self.log_flush_every = log_flush_every
        self.log_flush_seconds = log_flush_seconds
        self.lag = log_lag
        self.options = options
        self.step = 0  # the last completed step
        self.replaying = False
        self.replayed = 0
        self.report: ReplayReport | None = None
        self.ckpt: Checkpointer | None = None
        self._tracked: Mapping[str, Any] = {}
        self._world: World | None = None
        self._log_world: World | None = None
        self._recorder: Recorder | None = None
        self._contents: LogContents | None = None
        self._records: dict[int, StepRecord] = {}
        self._device = torch.device("cpu")
        self._placement = Placement()
        self._params: tuple[list[str], list[torch.Tensor], list[bool]] | None = None
        self._work: dict[str, Any] = {}
        self._resume_rng: dict[str, bytes] | None = None
        self._rng_skipped: set[str] = set()
        self._unusable: set[int] = set()
        self._due: int | None = None  # a snapshot decided at the end of this step, taken before the next
        self._pending: tuple[int, SaveHandle | None] | None = None
        self._last_snapshot = time.monotonic()
        self._replay_started = 0.0
        self._restore_s = 0.0
        self._closed = False
        self.snapshot_failures = 0

    # -- start ----------------------------------------------------------------------------------

    @property
    def rank(self) -> int:
        return self._world.rank if self._world is not None else 0

    @property
    def world_size(self) -> int:
        return self._world.world_size if self._world is not None else 1

    def open(self, tracked: Mapping[str, Any], device: torch.device) -> int | None:
        """Join the run (collective): restore the newest usable snapshot into ``tracked``.

        Args:
            tracked: what a snapshot holds, by name: modules, optimizers, schedulers, objects with
                ``state_dict``/``load_state_dict``. Read again at every snapshot.
            device: where the model lives (recorded with the log's placement).

        Returns:
            The restored step, or None for a new run (its first `begin` snapshots the state then,
            as the base of the log).
        """
        started = time.perf_counter()
        self._tracked = tracked
        self._device = device
        self.ckpt = Checkpointer(self.url, **self.options)
        timeout = timedelta(seconds=self.ckpt.options.collective_timeout_s)
        self._world = current_world(timeout)  # agreement on the training thread
        self._log_world = current_world(timeout)  # the recorder thread's own group
        steps = self.ckpt.steps()
        latest = self._world.broadcast_json(steps[-1] if steps else None, "choosing the snapshot to resume")
        if latest is None:
            return None
        step = self.ckpt.restore(dict(tracked), fallback=True)
        # newer committed snapshots failed their checks: the run overwrites them when it gets there
        self._unusable = {s for s in steps if s > step}
        self._resume_rng = rng_components()  # set again when the first step begins (see the module doc)
        self._restore_s = time.perf_counter() - started
        self._open_log(step)
        return step

    def _open_log(self, base: int) -> None:
        """Read the log after ``base`` (rank 0 settles it first) and start the recorder."""
        assert self.ckpt is not None and self._world is not None and self._log_world is not None
        self.step = base
        writer, problem = self._settle_log(base) if self._world.rank == 0 else (None, None)
        self._world.barrier("resuming the log")
        contents = records_after(self.ckpt.storage, base)  # rank 0 has settled it
        if problem is None and contents.corruption is not None:
            problem = str(contents.corruption)
        self._contents = contents
        self._records = {r.step: r for r in contents.records}
        self._placement = current_placement(self._world.world_size, self._device)
        changed = sorted(
            {
                d
                for r in contents.records
                for d in placement_changes(contents.placement(r.step) or self._placement, self._placement)
            }
        )
        records = contents.records
        self.report = ReplayReport(
            base_step=base,
            first_step=base + 1,
            last_step=base,
            logged_last_step=contents.last_step,
            strict=not changed,
            placement_logged=contents.placement(records[0].step) if records else None,
            placement_now=self._placement,
            placement_changes=changed,
            log_problem=problem,
            restore_s=self._restore_s,
        )
        self._recorder = Recorder(
            self._log_world,
            writer,
            contents,
            strict=not changed,
            names=[],
            sharded=[],
            flush_seconds=self.log_flush_seconds,
        )
        self._recorder.done_step = base
        self._last_snapshot = time.monotonic()
        self._replay_started = time.perf_counter()
        if records:
            log.info(
                "resumed from the snapshot of step %d; steps %d..%d are checked against the log%s",
                base,
                base + 1,
                records[-1].step,
                f" on a changed placement ({'; '.join(changed)}): drift is reported" if changed else "",
            )

    def _settle_log(self, base: int) -> tuple[LogWriter, str | None]:
        """Rank 0: continue the log after ``base``; set damaged records aside (as `moai_ckpt.run` does)."""
        assert self.ckpt is not None
        storage = self.ckpt.storage
        contents = records_after(storage, base)
        problem = None
        if contents.corruption is not None:
            problem = str(contents.corruption)
            if contents.carried_from is None:
                quarantine(storage, base, contents.last_step)
                contents = records_after(storage, base)
            log.warning("the log is damaged: %s; the steps after step %d run again live", problem, contents.last_step)
        writer, resumed = LogWriter.resume(storage, base, flush_every=self.log_flush_every)
        if contents.last_step > resumed.last_step:  # the snapshot committed before its log moved over
            writer.copy([r for r in contents.records if r.step > resumed.last_step], contents)
        return writer, problem

    # -- each step ------------------------------------------------------------------------------

    def begin(self, step: int, samples: list[int] | None = None) -> None:
        """Step ``step`` starts: take a snapshot that is due, capture the step's inputs.

        Args:
            step: the step about to run (the last completed one plus one).
            samples: the global sample indices of its batch (checked against the log on replay).
        """
        assert self.ckpt is not None
        if self._recorder is None:  # a new run: the state now is the base of the log
            self._base(step - 1)
        if step != self.step + 1:
            raise MoaiCkptError(
                f"step {step} begins after step {self.step}: the framework's step count and the run's disagree",
                url=self.ckpt.url,
                step=step,
            )
        if self._due is not None:
            self._snapshot(self._due)
            self._due = None
        if self._resume_rng is not None:
            load_rng_components(self._resume_rng)
            self._resume_rng = None
        record = self._records.get(step)
        if record is None and self.replaying:
            self._replay_done()
        self.replaying = record is not None
        self._work = {"rng": rng_components(), "samples": samples}
        if record is not None and self._contents is not None:
            # replay with the logged generator states (their comparison above checks the restore)
            mine = record.rng.get(f"rank{self.rank}", {})
            states = {gen: self._contents.blob(digest) for gen, digest in mine.items()}
            self._rng_skipped.update(load_rng_components(states))
        self._work["hparams"] = Hyperparameters.capture(self._tracked)

    def _base(self, step: int) -> None:
        """The first snapshot of a new run (synchronous: the log needs it as its base)."""
        assert self.ckpt is not None
        if step in log_bases(self.ckpt.storage):
            log.warning("the snapshot of step %d is missing but its log is there: replaying it from this state", step)
        self.ckpt.save(step, dict(self._tracked), overwrite=True)
        self._open_log(step)

    def end(self, step: int, loss: float | torch.Tensor, grad_norm: float | torch.Tensor | None = None) -> None:
        """Step ``step`` completed: hand its record to the recorder (logged, or checked on replay).

        Raises:
            ReplayDivergenceError: a replayed step differs from its record on the placement that wrote it.
        """
        recorder = self._recorder
        assert recorder is not None and self.ckpt is not None
        if self._params is None:
            self._params = parameters_of(self._tracked)
            recorder.names, recorder.sharded = self._params[0], self._params[2]
            if recorder.writer is not None:
                recorder.install_header(recorder.writer, self._placement)
        hp: Hyperparameters = self._work["hparams"]
        recorder.submit(
            StepWork(
                step=step,
                rng=self._work["rng"],
                hparams=hp.host,
                values=StepValues.capture(self._params[1], loss, grad_norm, hp),
                samples=self._work["samples"],
                snapshot_due=self.snapshot_every_s is not None
                and time.monotonic() - self._last_snapshot >= self.snapshot_every_s,
            )
        )
        recorder.wait(step - self.lag, timeout=2 * self.ckpt.options.collective_timeout_s)
        if self.replaying:
            self.replayed += 1
        self.step = step
        decision = recorder.decision(step - self.lag)
        self._maybe_settle_snapshot()
        timed = decision is not None and decision.snapshot
        if not self.replaying and (timed or (self.snapshot_every is not None and step % self.snapshot_every == 0)):
            self._due = step

    # -- the end --------------------------------------------------------------------------------

    def finish(self) -> ReplayReport | None:
        """Training finished: flush the log, report a replay that ran to the end, snapshot the last step."""
        if self._resume_rng is not None:  # restored, and no step left to run: the RNG is the snapshot's
            load_rng_components(self._resume_rng)
            self._resume_rng = None
        if self._recorder is None or self.ckpt is None:
            return self.report
        self._recorder.drain(timeout=2 * self.ckpt.options.collective_timeout_s)
        if self.replaying:
            self._replay_done()
        self._settle_snapshot()
        due, self._due = self._due, None  # a periodic snapshot of the last step has no next step to wait for
        if (self.snapshot_at_end or due == self.step) and self.ckpt.latest_step() != self.step:
            self._save_now(self.step)
        return self.report

    def close(self, *, failing: bool = False) -> None:
        """Flush the log, finish the snapshot in flight, release threads and process groups.

        With ``failing`` (an exception is on its way out) problems are logged, not raised.
        """
        if self._closed:
            return
        self._closed = True
        try:
            if self._recorder is not None and self._recorder.error is None and self.ckpt is not None:
                self._recorder.drain(timeout=2 * self.ckpt.options.collective_timeout_s)
            self._settle_snapshot()
        except Exception:
            if not failing:
                raise
            log.exception("while closing the run after an error")
        finally:
            if self._recorder is not None:
                self._recorder.close()
            for resource in (self.ckpt, self._world, self._log_world):
                if resource is not None:
                    resource.close()

    # -- snapshots ------------------------------------------------------------------------------

    def _snapshot(self, step: int) -> None:
        assert self.ckpt is not None
        self._last_snapshot = time.monotonic()
        if not self.async_snapshots:
            self._save_now(step)
            return
        self._settle_snapshot()
        handle = self.ckpt.save_async(step, dict(self._tracked), overwrite=step in self._unusable)
        self._pending = (step, handle)

    def _save_now(self, step: int) -> None:
        assert self.ckpt is not None and self._recorder is not None
        try:
            self.ckpt.save(step, dict(self._tracked), overwrite=step in self._unusable)
        except _SNAPSHOT_FAILURES as exc:
            self._snapshot_failed(step, exc)
            return
        self._unusable.discard(step)
        self._recorder.rebase(step)

    def _maybe_settle_snapshot(self) -> None:
        if self._pending is not None and self._pending[1] is not None and self._pending[1].done():
            self._settle_snapshot()

    def _settle_snapshot(self) -> None:
        if self._pending is None:
            return
        step, handle = self._pending
        self._pending = None
        if handle is None:
            return
        try:
            handle.result()
        except _SNAPSHOT_FAILURES as exc:
            self._snapshot_failed(step, exc)
            return
        self._unusable.discard(step)
        assert self._recorder is not None
        self._recorder.rebase(step)

    def _snapshot_failed(self, step: int, exc: Exception) -> None:
        """A snapshot that could not be written is not fatal: the log goes on from the last one."""
        if isinstance(exc, RankLostError):
            raise exc
        self.snapshot_failures += 1
        log.warning("the snapshot of step %d failed and is skipped (the log continues): %s", step, exc)

    # -- the replay report ----------------------------------------------------------------------

    def _replay_done(self) -> None:
        """The replayed steps are over: wait for their checks, report them (rank 0 writes the report)."""
        assert self._recorder is not None and self.report is not None and self.ckpt is not None
        self._recorder.wait(self.step, timeout=2 * self.ckpt.options.collective_timeout_s)
        report = self.report
        report.steps = list(self._recorder.checks)
        report.last_step = report.base_step + len(report.steps)
        report.replay_s = time.perf_counter() - self._replay_started
        report.rng_not_restored = sorted(self._rng_skipped)
        self.replaying = False
        if report.strict:
            log.info("replayed %d steps: every step bitwise equal to the log", report.replayed)
        else:
            drift = report.max_drift()
            log.warning(
                "replayed %d steps on a changed placement (%s); largest drift: loss %.3g, grad norm %.3g, "
                "parameter norm %.3g (relative)",
                report.replayed,
                "; ".join(report.placement_changes),
                drift["loss_rel"],
                drift["grad_norm_rel"],
                drift["state_rel"],
            )
        if self.rank == 0 and report.steps:
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            key = replay_report_key(stamp, report.base_step)
            try:
                self.ckpt.storage.write(key, report.model_dump_json(indent=1).encode())
            except MoaiCkptError as exc:  # a report is worth a warning, not the run
                log.warning("could not write the replay report %s: %s", key, exc)
