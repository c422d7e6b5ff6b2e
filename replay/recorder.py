"""The step pipeline: logs (or checks) each step's record on a background thread.

The training thread hands over what a step read and produced (`StepWork`: RNG states, scalars,
a pending device-to-host copy of its digests) and goes on with the next step. The recorder's
thread waits for the copy, gathers every rank's part over a group of its own, and then either
appends the record to the log (rank 0 writes; durable per the writer's policy) or, for a step
that is being replayed, compares it with the logged record.

The training thread bounds how far it runs ahead (`wait`): with a lag of one step, a record is
durable before the next step completes. Decisions every rank must take at the same step (stop
after a signal, take a time-based snapshot) come out of the gathered results (`decision`), so
they are identical everywhere.
"""

from __future__ import annotations

import base64
import json
import math
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

from moai_ckpt.distributed import World
from moai_ckpt.errors import MoaiCkptError
from replay.check import StepCheck, compare, params_array, params_blob
from replay.codec import join, pack, unpack
from replay.log import Digests, LogContents, LogWriter, Placement, SegmentHeader, StepRecord, digest_of
from replay.stepstate import StepValues


class ReplayDivergenceError(MoaiCkptError, RuntimeError):
    """A replayed step produced a different result than its record, on the same placement and
    device type: non-determinism or silent data corruption. ``check`` names the quantity."""

    def __init__(self, message: str, *, check: StepCheck | None = None, **where: Any) -> None:
        super().__init__(message, **where)
        self.check = check


@dataclass
class StepWork:
    """What one rank hands over at the end of a step."""

    step: int
    rng: dict[str, bytes]
    hparams: dict[str, Any]
    values: StepValues
    samples: list[int] | None = None
    batch: bytes | None = None  # this rank's part of a non-indexable batch, packed
    stop: int | None = None  # a signal this rank received
    snapshot_due: bool = False  # this rank's clock says a timed snapshot is due


@dataclass(frozen=True)
class Decision:
    """What every rank does after a step, decided from everyone's results."""

    stop: int | None
    snapshot: bool


class Recorder:
    """The background half of a run's logging and replay checking.

    Args:
        world: the ranks, over a group used by this recorder alone.
        writer: the log writer (rank 0) or None.
        logged: records to check steps against (the replay), by step, with their blobs.
        strict: raise `ReplayDivergenceError` at the first step that is not bitwise equal.
        names: parameter names, in the order their norms arrive.
        sharded: which parameters are sharded across ranks (their norms combine across ranks).
    """

    def __init__(
        self,
        world: World,
        writer: LogWriter | None,
        logged: LogContents | None,
        *,
        strict: bool,
        names: list[str],
        sharded: list[bool],
        flush_seconds: float | None = None,
    ) -> None:
        self.world = world
        self.writer = writer
        self.contents = logged
        self.logged = {r.step: r for r in logged.records} if logged is not None else {}
        self.strict = strict
        self.names = names
        self.sharded = sharded
        self.flush_seconds = flush_seconds
        self.checks: list[StepCheck] = []
        self.stats: dict[str, float] = {}  # seconds spent per phase of the thread's work, summed
        self.done_step = -1
        self.error: BaseException | None = None
        self._decisions: dict[int, Decision] = {}
        self._latest: dict[tuple[int, str], tuple[str, bytes]] = {}  # (rank, generator) -> its newest blob
        self._since_base: list[tuple[StepRecord, dict[str, bytes]]] = []
        self._queue: queue.Queue[Any] = queue.Queue()
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="moai-log", daemon=True)
        self._thread.start()

    # -- the training thread's side -------------------------------------------------------------

    def submit(self, work: StepWork) -> None:
        self._raise_if_failed()
        self._queue.put(work)

    def rebase(self, base: int) -> None:
        """Move the log to the snapshot at ``base`` (records after it are carried over)."""
        self._queue.put(("rebase", base))

    def wait(self, step: int, timeout: float | None = None) -> None:
        """Block until every step up to ``step`` is processed (logged or checked)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self.done_step < step and self.error is None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"the log of step {step} was not written within {timeout} s")
                self._cond.wait(left)
        self._raise_if_failed()

    def drain(self, timeout: float | None = None) -> None:
        """Write everything submitted so far, durably."""
        done = threading.Event()
        self._queue.put(("flush", done))
        deadline = None if timeout is None else time.monotonic() + timeout
        while not done.wait(0.05):
            if self.error is not None or not self._thread.is_alive():
                break
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"the log was not flushed within {timeout} s")
        self._raise_if_failed()

    def decision(self, step: int) -> Decision | None:
        with self._cond:
            return self._decisions.get(step)

    def close(self) -> None:
        """Stop the thread after what was submitted (does not raise)."""
        self._queue.put(None)
        self._thread.join(timeout=60)

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error

    # -- the background thread ------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=self.flush_seconds)
            except queue.Empty:
                if self.writer is not None and self.writer.pending:
                    self.writer.flush()  # a group commit is never older than flush_seconds
                continue
            if item is None:
                return
            try:
                if isinstance(item, StepWork):
                    self._process(item)
                elif item[0] == "rebase":
                    self._rebase(item[1])
                elif item[0] == "flush":
                    if self.writer is not None:
                        self.writer.flush()
                    item[1].set()
            except BaseException as exc:  # noqa: BLE001 - handed to the training thread
                with self._cond:
                    self.error = exc
                    self._cond.notify_all()
                if isinstance(item, tuple) and item[0] == "flush":
                    item[1].set()
                return

    def _process(self, work: StepWork) -> None:
        cpu = time.thread_time()
        started = time.perf_counter()
        norms, loss, grad_norm, device_hparams = work.values.read()
        read = time.perf_counter()
        rank = self.world.rank
        mine: dict[str, Any] = {
            "loss": loss,
            "grad_norm": grad_norm,
            "norms": norms,
            "rng": {},
            "blobs": {},
            "stop": work.stop,
            "snap": work.snapshot_due,
        }
        own_blobs: dict[str, bytes] = {}
        for gen, data in work.rng.items():
            digest = digest_of(data)
            mine["rng"][gen] = digest
            if self._latest.get((rank, gen), ("",))[0] != digest:
                self._latest[(rank, gen)] = (digest, data)
                own_blobs[digest] = data
        if rank == 0:
            mine["hparams"] = {**work.hparams, **device_hparams}
        if self.world.world_size > 1:
            if rank != 0:
                mine["blobs"] = {d: base64.b64encode(b).decode() for d, b in own_blobs.items()}
                if work.batch is not None:
                    mine["batch"] = base64.b64encode(work.batch).decode()
            everyone = self.world.all_gather_json(mine, f"log of step {work.step}")
        else:
            everyone = [mine]
        gathered = time.perf_counter()
        if rank == 0 and work.batch is not None:
            everyone[0]["batch"] = base64.b64encode(work.batch).decode()
        record, blobs, params = self._combine(work, everyone)
        logged = self.logged.get(work.step)
        combined = time.perf_counter()
        if logged is not None:
            self._check(logged, record, params)
        elif self.writer is not None:
            self.writer.append(record, blobs)
            self._since_base.append((record, blobs))
        done = time.perf_counter()
        for name, value in (
            ("device wait", read - started),
            ("gather", gathered - read),
            ("record", combined - gathered),
            ("write or check", done - combined),
        ):
            self.stats[name] = self.stats.get(name, 0.0) + value
        self.stats["cpu time"] = self.stats.get("cpu time", 0.0) + time.thread_time() - cpu
        self.stats["steps"] = self.stats.get("steps", 0.0) + 1
        stops = [e["stop"] for e in everyone if e["stop"] is not None]
        with self._cond:
            self._decisions[work.step] = Decision(stop=stops[0] if stops else None, snapshot=bool(everyone[0]["snap"]))
            self._decisions.pop(work.step - 8, None)
            self.done_step = work.step
            self._cond.notify_all()

    def _combine(
        self, work: StepWork, everyone: list[dict[str, Any]]
    ) -> tuple[StepRecord, dict[str, bytes], list[float]]:
        """One record from every rank's results (rank order fixes every float sum)."""
        for r, e in enumerate(everyone):
            for digest, b64 in e["blobs"].items():
                gen = next(g for g, d in e["rng"].items() if d == digest)
                self._latest[(r, gen)] = (digest, base64.b64decode(b64))
        blobs: dict[str, bytes] = {}
        rng: dict[str, dict[str, str]] = {}
        for r, e in enumerate(everyone):
            rng[f"rank{r}"] = e["rng"]
            for gen, digest in e["rng"].items():
                cached = self._latest.get((r, gen))
                if cached is not None and cached[0] == digest:
                    blobs[digest] = cached[1]
        params = []
        for i, sharded in enumerate(self.sharded):
            if sharded:
                params.append(math.sqrt(math.fsum(e["norms"][i] ** 2 for e in everyone)))
            else:
                params.append(float(everyone[0]["norms"][i]))
        params_data = params_blob(params)
        params_digest = digest_of(params_data) if params else None
        if params_digest:
            blobs[params_digest] = params_data
        batch_digest = None
        if "batch" in everyone[0]:
            parts = [unpack(base64.b64decode(e["batch"]))[0] for e in everyone]
            joined, rows = join(parts)
            data = pack(joined, rows)
            batch_digest = digest_of(data)
            blobs[batch_digest] = data
        losses = [e["loss"] for e in everyone]
        # built from values this process made itself: construct without re-validating (this is
        # the log thread's hot path, and it holds the GIL the training thread needs)
        record = StepRecord.model_construct(
            step=work.step,
            samples=work.samples,
            batch=batch_digest,
            rng=rng,
            hparams=everyone[0].get("hparams", {}),
            digests=Digests.model_construct(
                loss=math.fsum(losses) / len(losses),
                grad_norm=everyone[0]["grad_norm"],
                state=float.hex(math.sqrt(math.fsum(p * p for p in params))) if params else None,
                params=params_digest,
            ),
            wall_time=time.time(),
        )
        return record, blobs, params

    def _check(self, logged: StepRecord, replayed: StepRecord, params: list[float]) -> None:
        assert self.contents is not None
        blobs = self.contents.blobs
        logged_params = params_array(blobs.get(logged.digests.params or ""))
        header = self.contents.headers.get(logged.step)
        names_blob = blobs.get(header.params) if header is not None and header.params else None
        same_names = names_blob is not None and json.loads(names_blob) == self.names
        check = compare(logged, replayed, logged_params, params, self.names if same_names else [])
        self.checks.append(check)
        if self.strict and not check.bitwise:
            raise ReplayDivergenceError(
                f"replay diverged from the log at {check.describe()}; the run wrote this log on the same "
                "placement and device type, so this is non-determinism or silent data corruption",
                check=check,
                step=check.step,
            )

    def _rebase(self, base: int) -> None:
        if self.writer is None:
            return
        self.writer.flush()
        carried = [(r, b) for r, b in self._since_base if r.step > base]
        old = self.writer
        self.writer = LogWriter(
            old.storage, base, header=old.header, flush_every=old.flush_every, flush_seconds=old.flush_seconds
        )
        if old.header.params:
            self.writer.put_blob(self._names_blob())
        for record, blobs in carried:  # one segment: a crash leaves all of them or none
            self.writer._add(record, blobs)
            self.writer.last_step = record.step
        self.writer.flush()
        self._since_base = carried

    def _names_blob(self) -> bytes:
        return json.dumps(self.names).encode()

    def install_header(self, writer: LogWriter, placement: Placement) -> None:
        """Segments of ``writer`` say where they were written and name the parameters (once per log)."""
        digest = writer.put_blob(self._names_blob()) if self.names else None
        writer.set_header(SegmentHeader(base_step=writer.base_step, placement=placement, params=digest))
