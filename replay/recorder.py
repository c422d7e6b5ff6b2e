"""The step pipeline: logs (or checks) each step's record on a background thread.

The training thread hands over what a step read and produced (`StepWork`: RNG states, scalars,
a pending device-to-host copy of its norms, the exact digests of the whole tracked state in
flight) and goes on with the next step. The recorder's thread waits for them, gathers every
rank's part over a group of its own, and then either appends the record to the log (rank 0
writes; durable per the writer's policy) or, for a step that is being replayed, compares it with
the logged record.

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
from moai_ckpt.errors import CorruptLogError, ReplayDivergenceError
from replay import statedigest
from replay.check import RankState, StepCheck, compare, params_array, params_blob
from replay.codec import join, pack, unpack
from replay.log import (
    Digests,
    LogContents,
    LogWriter,
    Placement,
    SegmentHeader,
    StepRecord,
    digest_of,
    header_refs,
)
from replay.statedigest import PendingState
from replay.stepstate import StepValues


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
    state: PendingState | None = None  # exact digests of the tracked state after the step


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
        exact: compare the exact state digests of replayed steps (the log was written on this
            placement and device type; elsewhere they differ by nature).
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
        exact: bool = False,
    ) -> None:
        self.world = world
        self.writer = writer
        self.contents = logged
        self.logged = {r.step: r for r in logged.records} if logged is not None else {}
        self.strict = strict
        self.names = names
        self.sharded = sharded
        self.exact = exact
        self.flush_seconds = flush_seconds
        self.checks: list[StepCheck] = []
        self.stats: dict[str, float] = {}  # seconds spent per phase of the thread's work, summed
        self.done_step = -1
        self.error: BaseException | None = None
        self._decisions: dict[int, Decision] = {}
        self._latest: dict[tuple[int, str], tuple[str, bytes]] = {}  # (rank, generator) -> its newest blob
        # every record of the writer's log (logged ones still to replay, then live ones), with
        # their headers and blobs: a rebase carries those after the new base
        self._tail = _copy_of(logged, logged.records) if logged is not None else LogContents(0)
        self._state_names: list[list[str]] = []  # per rank, the entry names of its state digests
        self._sent_names: list[str] | None = None  # this rank's names as last gathered
        self._names_digest: str | None = None  # blob digest of every rank's names as they are now
        self._logged_names: dict[str, list[list[str]]] = {}  # names blob digest -> per-rank names
        self._header_blobs: dict[str, bytes] = {}  # blobs this recorder's segment headers name
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
        exact = work.state.packed() if work.state is not None else None
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
        if work.state is not None and exact is not None:
            mine["exact"] = exact
            if work.state.names != self._sent_names:  # names travel when they change, not every step
                mine["names"] = self._sent_names = work.state.names
        if self.world.world_size > 1:
            if "exact" in mine:
                mine["exact"] = base64.b64encode(mine["exact"]).decode()
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
            self._check(logged, record, params, blobs)
        elif self.writer is not None:
            self._append(record, blobs)
        done = time.perf_counter()
        for name, value in (
            ("device wait and state digests", read - started),
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
        exact = self._exact(everyone, blobs)
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
                exact=exact,
            ),
            wall_time=time.time(),
        )
        return record, blobs, params

    def _exact(self, everyone: list[dict[str, Any]], blobs: dict[str, bytes]) -> list[str] | None:
        """Every rank's packed state digests as blobs; per rank their blob digest (one if all agree)."""
        if not all("exact" in e for e in everyone):
            return None
        if len(self._state_names) != len(everyone):
            self._state_names = [[] for _ in everyone]
        refs = []
        for r, e in enumerate(everyone):
            if "names" in e:
                self._state_names[r] = e["names"]
                self._names_digest = None
            data = e["exact"] if isinstance(e["exact"], bytes) else base64.b64decode(e["exact"])
            digest = digest_of(data)
            blobs[digest] = data
            refs.append(digest)
        return refs[:1] if len(set(refs)) == 1 else refs

    def _append(self, record: StepRecord, blobs: dict[str, bytes]) -> None:
        """Rank 0: log a live step (under a header naming the state entries as they are now)."""
        assert self.writer is not None
        if record.digests.exact:
            if self._names_digest is None:
                self._names_digest = self._remember(statedigest.names_blob(self._state_names))
            digest = self._names_digest
            if self.writer.header.state != digest:  # a segment has one header: close the current one
                self.writer.flush()
                self.writer.set_header(self.writer.header.model_copy(update={"state": digest}))
                self.writer.put_blob(self._header_blobs[digest])
        self.writer.append(record, blobs)
        self._tail.records.append(record)
        self._tail.headers[record.step] = self.writer.header
        self._tail.blobs.update(blobs)

    def _remember(self, data: bytes) -> str:
        """Keep a blob a segment header names (written again by every log the records move to)."""
        digest = digest_of(data)
        self._header_blobs[digest] = data
        self._tail.blobs[digest] = data
        return digest

    def _check(self, logged: StepRecord, replayed: StepRecord, params: list[float], blobs: dict[str, bytes]) -> None:
        assert self.contents is not None
        logged_params = params_array(self.contents.blobs.get(logged.digests.params or ""))
        header = self.contents.headers.get(logged.step)
        names_blob = self.contents.blobs.get(header.params) if header is not None and header.params else None
        same_names = names_blob is not None and json.loads(names_blob) == self.names
        state = self._states(logged, replayed, blobs) if self.exact else None
        check = compare(logged, replayed, logged_params, params, self.names if same_names else [], state)
        self.checks.append(check)
        if self.strict and not check.bitwise:
            raise ReplayDivergenceError(
                f"replay diverged from the log at {check.describe()}; the run wrote this log on the same "
                "placement and device type, so this is non-determinism or silent data corruption",
                check=check,
                step=check.step,
            )

    def _states(
        self, logged: StepRecord, replayed: StepRecord, blobs: dict[str, bytes]
    ) -> tuple[list[RankState], list[RankState]] | None:
        """Every rank's (entry names, digests), logged and replayed; None for a record without them."""
        assert self.contents is not None
        header = self.contents.headers.get(logged.step)
        if not (logged.digests.exact and replayed.digests.exact and header is not None and header.state):
            return None
        try:
            names = self._logged_names.get(header.state)
            if names is None:
                names = self._logged_names[header.state] = statedigest.names_of(self.contents.blob(header.state))
            before = _rank_states(names, logged.digests.exact, self.contents.blob)
        except ValueError as exc:
            raise CorruptLogError(
                f"the state digests logged for step {logged.step} do not parse: {exc}", url=self.contents.url
            ) from exc
        return before, _rank_states(self._state_names, replayed.digests.exact, blobs.__getitem__)

    def _rebase(self, base: int) -> None:
        """Move the log to the snapshot at ``base``: records after it (logged ones a replay has yet
        to reach, live ones) are carried over with the headers they were written under."""
        if self.writer is None:
            return
        self.writer.flush()
        carried = [r for r in self._tail.records if r.step > base]
        old = self.writer
        current = {d: self._header_blobs.get(d) or self._tail.blob(d) for d in header_refs(old.header)}
        self.writer = LogWriter(
            old.storage,
            base,
            header=old.header,
            flush_every=old.flush_every,
            flush_seconds=old.flush_seconds,
            fence=old.fence,
            on_flush=old.on_flush,
        )
        self.writer.copy(carried, self._tail)  # one segment per header, each all or nothing
        self.writer.set_header(old.header)  # live records go on under the header of now
        for data in current.values():
            self.writer.put_blob(data)
        self._tail = _copy_of(self._tail, carried, base)
        self._tail.blobs.update(current)

    def _names_blob(self) -> bytes:
        return json.dumps(self.names).encode()

    def install_header(self, writer: LogWriter, placement: Placement) -> None:
        """Segments of ``writer`` say where they were written and name the parameters (once per log)."""
        digest = None
        if self.names:
            digest = self._remember(self._names_blob())
            writer.put_blob(self._header_blobs[digest])
        writer.set_header(SegmentHeader(base_step=writer.base_step, placement=placement, params=digest))


def _rank_states(names: list[list[str]], refs: list[str], blob: Any) -> list[RankState]:
    """Per rank (entry names, digests) from the per-rank names and the record's blob digests."""
    if len(refs) == 1:
        refs = refs * len(names)
    if len(refs) != len(names):
        raise ValueError(f"digests of {len(refs)} ranks for the names of {len(names)}")
    out = []
    for rank_names, ref in zip(names, refs, strict=True):
        digests = statedigest.unpack(blob(ref))
        if len(digests) != len(rank_names):
            raise ValueError(f"{len(digests)} state digests for {len(rank_names)} names")
        out.append((rank_names, digests))
    return out


def _copy_of(source: LogContents, records: list[StepRecord], base: int | None = None) -> LogContents:
    """``records`` of ``source`` with their headers and the blobs they and their headers name."""
    headers = {r.step: source.headers[r.step] for r in records if r.step in source.headers}
    wanted = {d for r in records for d in r.blob_refs()} | {d for h in headers.values() for d in header_refs(h)}
    return LogContents(
        source.base_step if base is None else base,
        records=list(records),
        blobs={d: source.blobs[d] for d in wanted if d in source.blobs},
        headers=headers,
        url=source.url,
    )
