"""`fault_tolerant`: wrap a training function so a killed run resumes at its last completed step.

    @moai_ckpt.fault_tolerant(storage="runs/r7", snapshot_every=100)
    def train(run):
        model, opt = build()
        run.track(model=model, optim=opt)
        sampler = run.sampler(len(dataset), global_batch_size=256)
        for step in run.steps(10_000):
            indices = run.batch()                 # this rank's samples of the global batch
            loss = ...
            run.record(loss=loss)                 # completes the step (logged, or checked on replay)

On start, the run restores the newest committed snapshot S, then *replays* steps S+1..F from the
op-stream log (``run.replaying`` is True: skip side effects), checking every step's digests, and
continues live from F+1. Each completed step appends one log record (durable on return by default);
snapshots are taken every ``snapshot_every`` steps (asynchronously by default). SIGTERM/SIGINT take a
snapshot and flush the log before exiting; a user exception flushes the log and propagates.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from types import FrameType
from typing import Any, TypeVar

import torch

from moai_ckpt.checkpointer import Checkpointer
from moai_ckpt.distributed import current_world
from moai_ckpt.errors import MoaiCkptError
from moai_ckpt.format import LOG
from moai_ckpt.rng import GlobalRNG
from moai_ckpt.sampler import GlobalSampler
from moai_ckpt.tree import TensorSink, decode, encode
from replay.log import Digests, LogWriter, StepRecord, get_blob, read_log

log = logging.getLogger("moai_ckpt.run")
R = TypeVar("R")


class ReplayDivergenceError(MoaiCkptError, RuntimeError):
    """A replayed step produced a different result than the logged one (same placement and device)."""


class Run:
    """The handle a `fault_tolerant` training function receives."""

    def __init__(
        self, storage: str, *, snapshot_every: int, async_snapshots: bool, log_flush_every: int, **options: Any
    ) -> None:
        self.ckpt = Checkpointer(storage, **options)
        # per-step agreement travels on a group of its own: background saves use the Checkpointer's
        self.world = current_world(timedelta(seconds=self.ckpt.options.collective_timeout_s))
        self.snapshot_every = snapshot_every
        self.async_snapshots = async_snapshots
        self.log_flush_every = log_flush_every
        self.tracked: dict[str, Any] = {}
        self.step = 0  # the last completed step
        self.replaying = False
        self.replayed = 0
        self._sampler: GlobalSampler | None = None
        self._records: dict[int, StepRecord] = {}
        self._writer: LogWriter | None = None
        self._pending: tuple[int, Any] | None = None  # (step, save handle) of a snapshot being written
        self._result: dict[str, Any] | None = None
        self._stop_signal: int | None = None
        self._batch: list[int] | None = None

    # -- what the training function calls ------------------------------------------------------

    def track(self, **objects: Any) -> None:
        """Objects whose state is snapshotted (modules, optimizers, schedulers, extras...)."""
        self.tracked.update(objects)

    def sampler(self, num_samples: int, global_batch_size: int, **options: Any) -> GlobalSampler:
        """The run's data position: a `GlobalSampler`, snapshotted with the state."""
        self._sampler = GlobalSampler(num_samples, global_batch_size, **options)
        self.tracked["_data"] = self._sampler
        return self._sampler

    def batch(self) -> list[int]:
        """This rank's sample indices for the current step (from the log while replaying)."""
        if self._sampler is None:
            raise RuntimeError("call run.sampler(...) before run.batch()")
        world = self.ckpt.world
        indices = self._sampler.global_batch()
        record = self._records.get(self.step + 1)
        if record is not None and record.samples is not None and record.samples != indices:
            raise ReplayDivergenceError(f"step {self.step + 1}: the sampler's batch differs from the logged one")
        self._sampler.advance(len(indices))
        self._batch = indices
        return GlobalSampler.split(indices, world.rank, world.world_size)

    def record(self, *, loss: float | torch.Tensor, grad_norm: float | torch.Tensor | None = None) -> None:
        """Complete the current step with its results."""
        self._result = {"loss": _scalar(loss), "grad_norm": None if grad_norm is None else _scalar(grad_norm)}

    def steps(self, total: int) -> Iterator[int]:
        """Step numbers to run, resuming after the last completed one (replaying logged steps first)."""
        self._start()
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            for step in range(self.step + 1, total + 1):
                self._begin(step)
                yield step
                self._end(step)
                if self._stop_signal is not None:
                    self._emergency_snapshot()
                    raise SystemExit(128 + self._stop_signal)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            self._flush()

    # -- the machinery --------------------------------------------------------------------------

    def _start(self) -> None:
        latest = self.ckpt.latest_step()
        if latest is None:
            self.ckpt.save(0, self.tracked)  # the log needs a base: the initial state
            latest = 0
        else:
            self.ckpt.restore(self.tracked, step=latest)
        self.step = latest
        if self.world.rank == 0:  # one writer of the log; the others read it once it is settled
            self._writer, contents = LogWriter.resume(self.ckpt.storage, latest, flush_every=self.log_flush_every)
            if contents.torn_tail:
                log.warning("dropped a torn log tail: %s", contents.torn_tail)
            records = contents.records or self._carried_over(latest)
            if records and not contents.records:  # the snapshot committed before its log was rebased
                for r in records:
                    self._writer.append(r)
                self._writer.flush()
        self.world.barrier("resuming the log")
        if self.world.rank != 0:
            self._writer = LogWriter(self.ckpt.storage, latest, flush_every=self.log_flush_every)
            self._writer.last_step = latest
            records = read_log(self.ckpt.storage, latest).records
        self._records = {r.step: r for r in records}
        if self._records:
            log.info("resuming at step %d: replaying steps %d..%d from the log", latest, latest + 1, max(self._records))

    def _carried_over(self, base: int) -> list[StepRecord]:
        """Records after ``base`` still only in an older snapshot's log (a crash right after an
        asynchronous snapshot committed, before the log moved over)."""
        bases = sorted((int(n) for n in self.ckpt.storage.list_dirs(LOG) if n.isdigit()), reverse=True)
        for older in (b for b in bases if b < base):
            tail = [r for r in read_log(self.ckpt.storage, older).records if r.step > base]
            if tail and tail[0].step == base + 1:
                return tail
        return []

    def _begin(self, step: int) -> None:
        record = self._records.get(step)
        self.replaying = record is not None
        self._result = None
        self._batch = None
        key = f"rank{self.world.rank}"
        if record is not None:
            self._rng_digest = record.rng.get(key, "")
            if self._rng_digest:
                GlobalRNG().load_state_dict(_load_rng(get_blob(self.ckpt.storage, self._rng_digest)))
        else:
            assert self._writer is not None
            self._rng_digest = self._writer.put_blob(_dump_rng(GlobalRNG().state_dict()))

    def _end(self, step: int) -> None:
        if self._result is None:
            raise RuntimeError(f"step {step} ended without run.record(loss=...)")
        mine = {
            "loss": self._result["loss"],
            "grad_norm": self._result["grad_norm"],
            "state": self._state_sum(),
            "rng": self._rng_digest,
            "stop": self._stop_signal,
        }
        everyone = self.world.all_gather_json(mine, f"step {step}")
        stops = [e["stop"] for e in everyone if e["stop"] is not None]
        if stops and self._stop_signal is None:
            self._stop_signal = stops[0]  # every rank stops after the same step
        digests = Digests(
            loss=sum(e["loss"] for e in everyone) / len(everyone),
            grad_norm=everyone[0]["grad_norm"],
            state=float.hex(sum(e["state"] for e in everyone)),
        )
        record = self._records.get(step)
        if record is not None:
            if record.digests != digests:
                raise ReplayDivergenceError(
                    f"step {step} replayed to {digests.model_dump()} but the log holds {record.digests.model_dump()}: "
                    "non-determinism or silent data corruption",
                    step=step,
                )
            self.replayed += 1
        elif self.world.rank == 0:
            assert self._writer is not None
            self._writer.append(
                StepRecord(
                    step=step,
                    samples=self._batch,
                    rng={f"rank{r}": e["rng"] for r, e in enumerate(everyone) if e["rng"]},
                    hparams=self._hparams(),
                    digests=digests,
                    wall_time=time.time(),
                )
            )
        self.step = step
        self._maybe_switch_log()
        if step % self.snapshot_every == 0 and step not in self._records:
            self._snapshot(step)

    def _snapshot(self, step: int) -> None:
        if self.async_snapshots:
            self._settle_snapshot()
            self._pending = (step, self.ckpt.save_async(step, self.tracked))
        else:
            self.ckpt.save(step, self.tracked)
            self._rebase(step)

    def _maybe_switch_log(self) -> None:
        if self._pending is not None and self._pending[1] is not None and self._pending[1].done():
            self._settle_snapshot()

    def _settle_snapshot(self) -> None:
        if self._pending is None:
            return
        step, handle = self._pending
        self._pending = None
        handle.result()
        self._rebase(step)

    def _rebase(self, base: int) -> None:
        """Continue the log after the snapshot at ``base`` (re-logging the steps done since)."""
        assert self._writer is not None
        if self.world.rank != 0:
            self._writer = LogWriter(self.ckpt.storage, base, flush_every=self.log_flush_every)
            return
        self._writer.flush()
        carried = [r for r in read_log(self.ckpt.storage, self._writer.base_step).records if r.step > base]
        self._writer = LogWriter(self.ckpt.storage, base, flush_every=self.log_flush_every)
        for r in carried:
            self._writer.append(r)
        self._writer.flush()

    def _emergency_snapshot(self) -> None:
        self._settle_snapshot()
        if self.ckpt.latest_step() != self.step:
            self.ckpt.save(self.step, self.tracked)
        log.warning("signal %s: snapshot of step %d taken, log flushed; exiting", self._stop_signal, self.step)

    def _flush(self) -> None:
        if self._writer is not None and self.world.rank == 0:
            self._writer.flush()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._stop_signal = signum

    def _hparams(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, obj in self.tracked.items():
            if isinstance(obj, torch.optim.Optimizer):
                out[f"{name}.lr"] = [float(g["lr"]) for g in obj.param_groups]
            elif isinstance(obj, torch.amp.GradScaler) and obj.is_enabled():
                out[f"{name}.scale"] = float(obj.get_scale())
        return out

    def _state_sum(self) -> float:
        """A cheap digest of this rank's updated parameters: the float64 sum of its tracked modules'."""
        total = 0.0
        for obj in self.tracked.values():
            if isinstance(obj, torch.nn.Module):
                for p in obj.parameters():
                    local = p.to_local() if hasattr(p, "to_local") else p
                    total += float(local.detach().sum(dtype=torch.float64))  # no float64 copy
        return total

    def close(self) -> None:
        try:
            self._settle_snapshot()
            self._flush()
        finally:
            self.ckpt.close()
            self.world.close()


def fault_tolerant(
    storage: str,
    *,
    snapshot_every: int = 100,
    async_snapshots: bool = True,
    log_flush_every: int = 1,
    deterministic: bool = False,
    **options: Any,
) -> Callable[[Callable[..., R]], Callable[..., R]]:
    """Make a training function resumable at its last completed step (see the module docstring).

    Args:
        storage: the run directory (any fsspec URL).
        snapshot_every: steps between snapshots.
        async_snapshots: take snapshots with `Checkpointer.save_async`.
        log_flush_every: log records per durable segment (1: every step durable when it ends).
        deterministic: ``torch.use_deterministic_algorithms(True)`` and the environment it needs.
        **options: `Checkpointer` options and storage options.
    """
    if snapshot_every < 1:
        raise ValueError("snapshot_every must be at least 1")

    def wrap(fn: Callable[..., R]) -> Callable[..., R]:
        @functools.wraps(fn)
        def runner(*args: Any, **kwargs: Any) -> R:
            if deterministic:
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
                torch.use_deterministic_algorithms(True)
            run = Run(
                storage,
                snapshot_every=snapshot_every,
                async_snapshots=async_snapshots,
                log_flush_every=log_flush_every,
                **options,
            )
            try:
                return fn(run, *args, **kwargs)
            finally:
                run.close()

        return runner

    return wrap


def _scalar(x: float | torch.Tensor) -> float:
    return float(x.detach()) if isinstance(x, torch.Tensor) else float(x)


def _dump_rng(state: dict[str, Any]) -> bytes:
    sink = TensorSink(lambda path: path)
    tree = encode(state, "rng", sink)
    tensors = {k: base64.b64encode(v.contiguous().numpy().tobytes()).decode() for k, v in sink.tensors.items()}
    meta = {k: [str(v.dtype).removeprefix("torch."), list(v.shape)] for k, v in sink.tensors.items()}
    return json.dumps({"tree": tree, "tensors": tensors, "meta": meta}, sort_keys=True).encode()


def _load_rng(data: bytes) -> dict[str, Any]:
    raw = json.loads(data)
    tensors = {}
    for name, b64 in raw["tensors"].items():
        dtype, shape = raw["meta"][name]
        buf = bytearray(base64.b64decode(b64))
        tensors[name] = (
            torch.frombuffer(buf, dtype=getattr(torch, dtype)).reshape(shape).clone()
            if buf
            else torch.empty(shape, dtype=getattr(torch, dtype))
        )
    return decode(raw["tree"], tensors)
