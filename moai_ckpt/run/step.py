"""The begin and the end of each step: its inputs captured (or set to the logged ones), its results logged.

At `StepCycle.begin` the step's RNG states and hyperparameters are captured; a step the log holds
(a replay) runs with its logged RNG states instead. Between begin and end the run fills in the
`StepState` (samples, batch, loss, grad norm, extra scalars). At `StepCycle.end` everything goes
to the `Recorder` as one `StepWork` (the norms and the exact state digests are started on a
side stream, `LogStream`, from a plan kept between steps, `StateDigests`; nothing waits for the
device); the training thread then waits only until the record of the step
``lag`` steps back is done, and reads the decision every rank takes after it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from moai_ckpt import faults
from moai_ckpt.run.logstream import LogStream
from moai_ckpt.run.resume import OpenLog
from replay.log import LogContents, Placement, StepRecord
from replay.recorder import Decision, Recorder, StepWork
from replay.stateplan import StateDigests
from replay.stepstate import Hyperparameters, StepValues, load_rng_components, rng_components

__all__ = ["StepCycle", "StepState"]

Scalar = float | int | bool
ParameterList = tuple[list[str], list[torch.Tensor], list[bool]]  # (names, local tensors, sharded?)


@dataclass
class StepState:
    """What one step read and produced, from its begin to its end."""

    step: int
    record: StepRecord | None  # the logged record this step replays (None: a live step)
    rng: dict[str, bytes]  # every generator's state at step start
    hparams: Hyperparameters  # the scalars in force at step start
    samples: list[int] | None = None  # the global batch's sample indices
    batch: bytes | None = None  # this rank's part of a non-indexable batch, packed
    loss: float | torch.Tensor | None = None
    grad_norm: float | torch.Tensor | None = None
    recorded: bool = False  # the loss was given
    extra_hparams: dict[str, Scalar] = field(default_factory=dict)  # `Run.hparam` values

    def record_results(self, loss: float | torch.Tensor, grad_norm: float | torch.Tensor | None) -> None:
        self.loss, self.grad_norm, self.recorded = loss, grad_norm, True


def _full(x: float | torch.Tensor | None) -> float | torch.Tensor | None:
    """A DTensor's value every rank agrees on (FSDP2's clip_grad_norm_), taken on the training stream."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x  # type: ignore[union-attr]


class StepCycle:
    """The steps of a run after its base: begin, end, and what the replay has done so far.

    Args:
        opened: the log after the base (its records, its recorder, the placement it records).
        rank: this process's rank (whose logged RNG states a replayed step takes).
        lag: how many completed steps a record may trail by.
        timeout_s: the bound on waiting for the recorder.
        from_initial_state: the base is the state the training function built (no snapshot).
        state_digests: hand the exact digests of the whole state to the recorder every step.
    """

    def __init__(
        self,
        opened: OpenLog,
        *,
        rank: int,
        lag: int,
        timeout_s: float,
        from_initial_state: bool,
        state_digests: bool,
    ) -> None:
        self.recorder: Recorder = opened.recorder
        self.contents: LogContents = opened.contents
        self.records = opened.records
        self.placement: Placement = opened.placement
        self.rank = rank
        self.lag = lag
        self.timeout_s = timeout_s
        self.from_initial_state = from_initial_state
        self.state_digests = state_digests
        self.digests = StateDigests() if state_digests else None
        self.stream = LogStream()
        self.step = opened.base  # the last completed step
        self.replaying = False
        self.replayed = 0
        self.current: StepState | None = None
        self.rng_skipped: set[str] = set()
        self.replay_started = time.perf_counter()
        self.stats: dict[str, float] = {}  # seconds per phase on the training thread, summed
        self._params: ParameterList | None = None

    def logged(self, step: int) -> StepRecord | None:
        """The record of ``step`` this run replays, if any."""
        return self.records.get(step)

    def begin(self, step: int, tracked: Mapping[str, Any], samples: list[int] | None = None) -> StepState:
        """Step ``step`` starts: capture its inputs; a replayed step takes its logged RNG states."""
        self.stream.guard(tracked)
        self.stream.before_step()
        record = self.records.get(step)
        self.replaying = record is not None
        rng = rng_components()
        if record is not None:
            mine = record.rng.get(f"rank{self.rank}", {})
            if mine:
                logged = {gen: self.contents.blob(digest) for gen, digest in mine.items()}
                self.rng_skipped.update(load_rng_components(logged))
                if self.from_initial_state and self.replayed == 0:
                    # rebuilt from scratch, the generators a job never seeds start anywhere: the
                    # logged states are what this step uses, and they are what is compared
                    rng = {**rng, **logged}
        state = StepState(step, record, rng, Hyperparameters.capture(tracked), samples=samples)
        self.current = state
        return state

    def end(
        self,
        state: StepState,
        *,
        parameters: Callable[[], ParameterList],
        snapshot_state: Callable[[], dict[str, Any]],
        stop: int | None,
        snapshot_due: bool,
    ) -> Decision | None:
        """Hand the step to the recorder, wait for the record ``lag`` steps back, return its decision.

        Raises:
            RuntimeError: the step has no loss (``run.record(loss=...)`` was not called).
            ReplayDivergenceError: a replayed step differs from its record (strict replays).
        """
        started = time.perf_counter()
        if not state.recorded:
            raise RuntimeError(f"step {state.step} ended without run.record(loss=...)")
        faults.point("step.end")
        params = self._parameters(parameters)
        assert state.loss is not None
        for key, value in state.extra_hparams.items():
            state.hparams._add(key, value)
        loss, grad_norm = _full(state.loss), _full(state.grad_norm)
        assert loss is not None
        digests = self.digests
        # norms and digests on a side stream, in the order the waits of `LogStream` expect
        with self.stream.side(params[0].device if params else torch.device("cpu")):
            self.stream.keep(loss, grad_norm, *state.hparams.device.values())
            pending = None
            if digests is not None:
                pending = digests.capture(snapshot_state(), between=self.stream.mark_early)
            values = StepValues.capture(params, loss, grad_norm, state.hparams)
            self.stream.mark_late()
        self.recorder.submit(
            StepWork(
                step=state.step,
                rng=state.rng,
                hparams=state.hparams.host,
                values=values,
                samples=state.samples,
                batch=state.batch,
                stop=stop,
                snapshot_due=snapshot_due,
                state=pending,
            )
        )
        waiting = self.count("step end", started)
        self.recorder.wait(state.step - self.lag, timeout=self.timeout_s)
        self.count("waiting for the log", waiting)
        self.stats["steps"] = self.stats.get("steps", 0.0) + 1
        if self.replaying:
            self.replayed += 1
        self.step = state.step
        self.current = None
        return self.recorder.decision(state.step - self.lag)

    def close(self) -> None:
        """Stop waiting for the log's reads before optimizer steps (the run is closing)."""
        self.stream.close()

    def _parameters(self, parameters: Callable[[], ParameterList]) -> list[torch.Tensor]:
        """The tensors whose norms the log records, found at the first step end (the header names them)."""
        if self._params is None:
            self._params = parameters()
            self.recorder.names, self.recorder.sharded = self._params[0], self._params[2]
            if self.recorder.writer is not None:
                self.recorder.install_header(self.recorder.writer, self.placement)
        return self._params[1]

    def count(self, name: str, since: float) -> float:
        """Add the time since ``since`` to the phase ``name``; returns now."""
        now = time.perf_counter()
        self.stats[name] = self.stats.get(name, 0.0) + now - since
        return now

    def log_stats(self) -> dict[str, float]:
        """Mean milliseconds per step on the training thread and on the recorder's thread, per phase."""
        out = {}
        steps = max(self.stats.get("steps", 0.0), 1.0)
        for name, total in self.stats.items():
            if name != "steps":
                out[f"training thread: {name}"] = 1e3 * total / steps
        rec = self.recorder.stats
        for name, total in rec.items():
            if name != "steps":
                out[f"log thread: {name}"] = 1e3 * total / max(rec.get("steps", 0.0), 1.0)
        return out
