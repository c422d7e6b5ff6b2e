"""The op-stream log: one record per completed step after a snapshot, in immutable segments.

Layout below the run directory::

    log/<base step:012d>/<first:012d>-<last:012d>.seg   records of steps first..last after the
                                                         snapshot at base, framed (see below)

Every segment is written whole, once: no append, no rename, so object stores work as local disks
do. A segment is a sequence of frames::

    magic (4 bytes) | length (u32 LE) | crc32c(payload) (u32 LE) | payload

``MSEG`` opens every segment: a JSON `SegmentHeader` (who wrote it, on which placement).
``MBLB`` is a content-addressed value: the sha256 of the data (32 bytes), then the data (RNG
states, batches that are not indexable, parameter and state entry names, each rank's exact state
digests). A blob is written once per log, in the first segment that needs it, before the records
that name it. ``MLOG`` is a JSON `StepRecord`.

Reading stops at the first damaged frame: a frame cut short, or a bad last frame of the newest
segment, is a torn tail (the writer died mid-write) and is dropped; damage anywhere else is
corruption, and the records before it are all a replay may use.
"""

from __future__ import annotations

import hashlib
import logging
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import crc32c as _crc32c
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from moai_ckpt import faults
from moai_ckpt.errors import CorruptLogError, UnsupportedFormatError, redact_url
from moai_ckpt.layout import LOG, log_base_steps, log_dir, log_segment_key, parse_log_segment
from moai_ckpt.storage import Storage

log = logging.getLogger("replay.log")

HEADER_FRAME, BLOB_FRAME, RECORD_FRAME = b"MSEG", b"MBLB", b"MLOG"
FRAME = struct.Struct("<4sII")
MAX_FRAME = 256 << 20
MAX_SEGMENT_BYTES = 1 << 30  # a segment is read whole: a larger object is refused unread
LOG_VERSION = 3  # 3: exact state digests (`Digests.exact`, `SegmentHeader.state`); 2 still reads


class Placement(BaseModel):
    """Where records were produced: replay on the same placement must reproduce them bitwise."""

    model_config = ConfigDict(frozen=True, extra="allow")

    world_size: int = 1
    device_type: str = "cpu"
    device_name: str = ""
    torch: str = ""

    def differences(self, other: Placement) -> list[str]:
        """What differs between two placements, as ``"field: a -> b"``; empty when the same."""
        fields = ("world_size", "device_type", "device_name", "torch")
        return [
            f"{f}: {getattr(self, f)} -> {getattr(other, f)}" for f in fields if getattr(self, f) != getattr(other, f)
        ]


class SegmentHeader(BaseModel):
    """The first frame of every segment."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: int = LOG_VERSION
    base_step: int = Field(ge=0)
    placement: Placement = Field(default_factory=Placement)
    params: str | None = Field(default=None, description="blob digest of the parameter names (JSON list)")
    state: str | None = Field(
        default=None, description="blob digest of every rank's state entry names (`replay.statedigest.names_blob`)"
    )
    created: float = Field(default_factory=time.time)


class Digests(BaseModel):
    """What a step produced, for checking its replay."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    loss: float | None = None
    grad_norm: float | None = None
    state: str | None = Field(default=None, description="float.hex of the L2 norm of every parameter")
    params: str | None = Field(default=None, description="blob digest of each parameter's L2 norm (float64 LE)")
    exact: list[str] | None = Field(
        default=None,
        description="per rank, blob digest of its exact state digests (`replay.statedigest.pack`), in the "
        "order of the segment header's state names; one entry when every rank's are the same",
    )


class StepRecord(BaseModel):
    """One completed step: its logical inputs and its result digests.

    Samples are *global* indices (see `moai_ckpt.GlobalSampler`), and a non-indexable batch is the
    global batch (every rank's part, concatenated): a log written on 8 ranks replays on 3.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: int = LOG_VERSION
    step: int = Field(ge=1, description="the state after this record is the state at `step`")
    samples: list[int] | None = Field(default=None, description="global sample indices of the batch")
    batch: str | None = Field(default=None, description="blob digest of the global batch, when not indexable")
    rng: dict[str, dict[str, str]] = Field(
        default_factory=dict, description="rank -> generator -> blob digest of its state at step start"
    )
    hparams: dict[str, Any] = Field(default_factory=dict, description="scalars in force: lr per group, loss scale...")
    digests: Digests = Field(default_factory=Digests)
    wall_time: float | None = None

    def blob_refs(self) -> set[str]:
        refs = {d for gens in self.rng.values() for d in gens.values()}
        if self.batch:
            refs.add(self.batch)
        if self.digests.params:
            refs.add(self.digests.params)
        refs.update(self.digests.exact or ())
        return refs


def header_refs(header: SegmentHeader) -> list[str]:
    """The blobs a segment header names (parameter names, state entry names)."""
    return [d for d in (header.params, header.state) if d]


def same_header(a: SegmentHeader, b: SegmentHeader) -> bool:
    """Whether records under ``a`` may share a segment with records under ``b``."""
    return (a.placement, a.params, a.state) == (b.placement, b.params, b.state)


def frame(kind: bytes, payload: bytes) -> bytes:
    if len(payload) > MAX_FRAME:
        raise ValueError(f"log frame of {len(payload)} bytes exceeds {MAX_FRAME}")
    return FRAME.pack(kind, len(payload), _crc32c.crc32c(payload)) + payload


def blob_frame(digest: str, data: bytes) -> bytes:
    return frame(BLOB_FRAME, bytes.fromhex(digest) + data)


def digest_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Damage:
    """The first damaged frame of a segment: its byte offset and what is wrong."""

    offset: int
    reason: str
    at_end: bool  # nothing valid could follow: the shape of a write cut short


def unframe(data: bytes) -> tuple[list[tuple[bytes, bytes]], Damage | None]:
    """Split a segment into (kind, payload) frames, stopping at the first damaged frame."""
    out: list[tuple[bytes, bytes]] = []
    offset = 0
    view = memoryview(data)
    while offset < len(data):
        rest = len(data) - offset
        if rest < FRAME.size:
            return out, Damage(offset, "incomplete frame header", True)
        kind, length, crc = FRAME.unpack_from(data, offset)
        if kind not in (HEADER_FRAME, BLOB_FRAME, RECORD_FRAME) or length > MAX_FRAME:
            return out, Damage(offset, "bad frame header", not any(view[offset:]))  # zeros: unwritten blocks
        end = offset + FRAME.size + length
        if end > len(data):
            return out, Damage(offset, f"frame of {length} bytes cut short", True)
        payload = bytes(view[offset + FRAME.size : end])
        if _crc32c.crc32c(payload) != crc:
            return out, Damage(offset, "frame crc32c mismatch", end == len(data))
        out.append((kind, payload))
        offset = end
    return out, None


# keys -----------------------------------------------------------------------------------------


def segments(storage: Storage, base_step: int) -> list[tuple[int, int, str]]:
    """(first, last, key) of every segment after ``base_step``, in order."""
    found = []
    for key in storage.list(log_dir(base_step)):
        parsed = parse_log_segment(key.rsplit("/", 1)[-1])
        if parsed is not None:
            found.append((*parsed, key))
    return sorted(found)


def log_bases(storage: Storage) -> list[int]:
    """Base steps of every log in the run directory, ascending."""
    return log_base_steps(storage.list_dirs(LOG), storage.url)  # twelve ASCII digits, nothing else


# reading --------------------------------------------------------------------------------------


@dataclass
class LogContents:
    """What a log holds after a snapshot: valid records in order, their blobs, why reading stopped."""

    base_step: int
    records: list[StepRecord] = field(default_factory=list)
    blobs: dict[str, bytes] = field(default_factory=dict)
    headers: dict[int, SegmentHeader] = field(default_factory=dict)  # step -> header of its segment
    torn_tail: str | None = None  # a write cut short at the end: expected after a crash, dropped
    corruption: CorruptLogError | None = None  # replay must stop before this
    url: str = ""
    carried_from: int | None = None  # the older log the last records were found in (see `records_after`)

    @property
    def last_step(self) -> int:
        return self.records[-1].step if self.records else self.base_step

    def blob(self, digest: str) -> bytes:
        try:
            return self.blobs[digest]
        except KeyError:
            raise CorruptLogError(f"blob {digest} named by the log is missing", url=self.url) from None

    def placement(self, step: int) -> Placement | None:
        header = self.headers.get(step)
        return header.placement if header is not None else None


class _Reader:
    def __init__(self, storage: Storage, base_step: int) -> None:
        self.storage = storage
        self.contents = LogContents(base_step, url=storage.url)
        self.by_step: dict[int, bytes] = {}
        self.segment_last = -1  # the last step recorded in the segment being read

    def read(self) -> LogContents:
        found = segments(self.storage, self.contents.base_step)
        for i, (_first, last, key) in enumerate(found):
            data = self.storage.read(key, MAX_SEGMENT_BYTES)
            frames, damage = unframe(data)
            header: SegmentHeader | None = None
            self.segment_last = -1
            for kind, payload in frames:
                header, problem = self._take(kind, payload, header, key)
                if problem is not None:
                    self.contents.corruption = problem
                    return self.contents
            if damage is None and self.segment_last < last:
                # a segment is written whole and named after its last record: one that ends
                # earlier was cut at a frame boundary
                damage = Damage(len(data), f"segment ends before step {last}, the last its name says", True)
            if damage is not None:
                where = f"{damage.reason} at byte {damage.offset} after step {self.contents.last_step}"
                if damage.at_end and i == len(found) - 1:
                    self.contents.torn_tail = f"{key}: {where}"
                else:
                    self.contents.corruption = CorruptLogError(
                        f"log record damaged ({where}); replay stops at step {self.contents.last_step}",
                        url=self.storage.url,
                        key=key,
                    )
                return self.contents
        return self.contents

    def _take(
        self, kind: bytes, payload: bytes, header: SegmentHeader | None, key: str
    ) -> tuple[SegmentHeader | None, CorruptLogError | None]:
        url, at = self.storage.url, self.contents.last_step
        if kind == HEADER_FRAME:
            if header is not None:
                return header, CorruptLogError(f"second segment header; replay stops at step {at}", url=url, key=key)
            try:
                return SegmentHeader.model_validate_json(payload), _check_version(payload, url, key)
            except ValidationError as exc:
                return None, CorruptLogError(f"segment header does not validate: {exc}", url=url, key=key)
        if header is None:
            return None, CorruptLogError(f"segment has no header; replay stops at step {at}", url=url, key=key)
        if kind == BLOB_FRAME:
            digest, data = payload[:32].hex(), payload[32:]
            if digest_of(data) != digest:
                return header, CorruptLogError(f"blob {digest} does not match its digest", url=url, key=key)
            self.contents.blobs[digest] = data
            return header, None
        return header, self._record(payload, header, key)

    def _record(self, payload: bytes, header: SegmentHeader, key: str) -> CorruptLogError | None:
        url = self.storage.url
        try:
            record = StepRecord.model_validate_json(payload)
        except ValidationError as exc:
            return _check_version(payload, url, key) or CorruptLogError(
                f"log record does not validate: {exc}", url=url, key=key
            )
        self.segment_last = max(self.segment_last, record.step)
        if record.step in self.by_step:
            if self.by_step[record.step] != payload:
                return CorruptLogError(f"two different records for step {record.step}", url=url, key=key)
            return None
        last = self.contents.last_step
        if record.step != last + 1:
            return CorruptLogError(
                f"log jumps from step {last} to {record.step}: records are missing", url=url, key=key
            )
        refs = record.blob_refs() | ({header.state} if record.digests.exact and header.state else set())
        missing = [d for d in refs if d not in self.contents.blobs]
        if missing:
            return CorruptLogError(
                f"record of step {record.step} names blob {missing[0]} that the log does not hold; "
                f"replay stops at step {last}",
                url=url,
                key=key,
            )
        self.by_step[record.step] = payload
        self.contents.records.append(record)
        self.contents.headers[record.step] = header
        return None


def _check_version(payload: bytes, url: str, key: str) -> CorruptLogError | None:
    """A frame from a newer release is refused with an upgrade hint, not taken for corruption."""
    try:
        import json

        version = json.loads(payload).get("version")
    except (ValueError, AttributeError, RecursionError):
        return None
    if isinstance(version, int) and version > LOG_VERSION:
        raise UnsupportedFormatError(
            f"log format version {version} is newer than this moai-ckpt reads ({LOG_VERSION}); upgrade moai-ckpt",
            url=url,
            key=key,
        )
    return None


def read_log(storage: Storage, base_step: int) -> LogContents:
    """Read the records after the snapshot at ``base_step``, checking framing and continuity.

    Segments may overlap (a segment rewritten after a torn tail, with the old one not yet
    deleted): a step seen twice must carry the same record.
    """
    return _Reader(storage, base_step).read()


def records_after(storage: Storage, base_step: int) -> LogContents:
    """The log a run resuming from the snapshot at ``base_step`` replays.

    Normally ``log/<base_step>``. If the run crashed after that snapshot committed but before
    its log moved over (or while it moved), records after ``base_step`` are still, or also, in an
    older snapshot's log: the longer continuation is returned (with its blobs) as the contents of
    ``base_step``, provided the two agree where both hold a step.
    """
    contents = read_log(storage, base_step)
    if contents.corruption is not None:
        return contents
    for older in reversed([b for b in log_bases(storage) if b < base_step]):
        previous = read_log(storage, older)
        tail = [r for r in previous.records if r.step > base_step]
        if not tail or tail[0].step != base_step + 1 or tail[-1].step <= contents.last_step:
            continue
        overlap = {r.step: r for r in tail if r.step <= contents.last_step}
        if any(overlap[r.step] != r for r in contents.records):
            continue  # the two logs disagree: keep the newer one's own records
        _append(contents, previous, [r for r in tail if r.step > contents.last_step])
        contents.corruption = contents.corruption or previous.corruption
        break
    if contents.corruption is None:
        _extend_with_later_logs(storage, contents)
    return contents


def _append(contents: LogContents, source: LogContents, extra: list[StepRecord]) -> None:
    """Continue ``contents`` with records of another log, with their headers and blobs."""
    contents.records.extend(extra)
    for r in extra:
        contents.headers[r.step] = source.headers[r.step]
    wanted = {d for r in extra for d in r.blob_refs()} | {d for h in source.headers.values() for d in header_refs(h)}
    contents.blobs.update({d: source.blobs[d] for d in wanted if d in source.blobs})
    contents.carried_from = source.base_step


def _extend_with_later_logs(storage: Storage, contents: LogContents) -> None:
    """Continue ``contents`` with the logs of later snapshots its records reach.

    A run restored from an older snapshot (the newer one is corrupt) replays through the later
    snapshots' logs: they hold the records after those snapshots.
    """
    for later in (b for b in log_bases(storage) if b > contents.base_step):
        if later > contents.last_step:
            break  # a gap: the records between last_step and this snapshot are nowhere
        following = read_log(storage, later)
        extra = [r for r in following.records if r.step > contents.last_step]
        if not extra or extra[0].step != contents.last_step + 1:
            continue
        _append(contents, following, extra)
        if following.corruption is not None:
            contents.corruption = following.corruption
            break


def history(storage: Storage) -> dict[int, StepRecord]:
    """Every valid record in every log of the run, by step (a later log wins a shared step)."""
    out: dict[int, StepRecord] = {}
    for base in log_bases(storage):
        for record in read_log(storage, base).records:
            out[record.step] = record
    return out


# writing --------------------------------------------------------------------------------------


class LogWriter:
    """Appends the records of steps after the snapshot at ``base_step``.

    Args:
        storage: the run directory.
        base_step: the committed snapshot the records continue from.
        header: what every segment says about its writer (placement, parameter names).
        flush_every: write a segment every this many records (1: each record durable on return).
        flush_seconds: also write a segment once the oldest unwritten record is this old.
    """

    def __init__(
        self,
        storage: Storage,
        base_step: int,
        *,
        header: SegmentHeader | None = None,
        flush_every: int = 1,
        flush_seconds: float | None = None,
        fence: Callable[[], None] | None = None,
        on_flush: Callable[[int, int, float], None] | None = None,
    ) -> None:
        if flush_every < 1:
            raise ValueError("flush_every must be at least 1")
        self.storage = storage
        #: called after every segment write with its last step, its size and the seconds it took
        self.on_flush = on_flush
        #: called before every segment write: raises when this writer no longer holds the run
        #: (a zombie after a takeover writes no further segment)
        self.fence = fence
        self.base_step = base_step
        self.header = (header or SegmentHeader(base_step=base_step)).model_copy(update={"base_step": base_step})
        self.flush_every = flush_every
        self.flush_seconds = flush_seconds
        self._frames: list[bytes] = []
        self._steps: list[int] = []
        self._pending_since = 0.0
        self._known: set[str] = set()  # blobs this log already holds
        self.last_step = base_step
        self.segments_written = 0

    @classmethod
    def resume(cls, storage: Storage, base_step: int, **options: Any) -> tuple[LogWriter, LogContents]:
        """Continue the log after a restart: keep every valid record, drop a torn tail.

        The valid part of a torn segment is rewritten as a new segment before the torn one is
        deleted, so a crash in between leaves two overlapping, consistent segments.
        Raises `CorruptLogError` if the log is corrupt (not merely torn).
        """
        contents = read_log(storage, base_step)
        if contents.corruption is not None:
            raise contents.corruption
        writer = cls(storage, base_step, **options)
        torn = [(first, key) for first, last, key in segments(storage, base_step) if last > contents.last_step]
        for first, key in torn:
            kept = [r for r in contents.records if first <= r.step]
            if kept:  # a blob may live only in the torn segment: the rewrite carries its own
                writer.last_step = kept[0].step - 1
                writer.copy(kept, contents)
            storage.delete([key])
        writer.last_step = contents.last_step
        # blobs that lived only in a deleted torn segment are gone: ask the log what it holds now
        writer._known = set(read_log(storage, base_step).blobs) if torn else set(contents.blobs)
        return writer, contents

    def copy(self, records: list[StepRecord], contents: LogContents) -> None:
        """Append records read from a log, each under the header of the segment it came from."""
        for record in records:
            header = contents.headers.get(record.step)
            if header is not None and not same_header(header, self.header):
                self.flush()
                self.set_header(header)
            for digest in header_refs(self.header):  # a new log needs them too
                if digest not in self._known:
                    self._put(digest, contents.blob(digest))
            if record.step != self.last_step + 1:
                raise ValueError(f"expected a record for step {self.last_step + 1}, got step {record.step}")
            self._add(record, {d: contents.blob(d) for d in record.blob_refs()})  # one segment per header
            self.last_step = record.step
        self.flush()

    def set_header(self, header: SegmentHeader) -> None:
        """Segments written from now on carry ``header`` (its blobs must be added with `put_blob`)."""
        self.header = header.model_copy(update={"base_step": self.base_step})

    def put_blob(self, data: bytes) -> str:
        """Add ``data`` to the next segment unless this log holds it already; returns its digest."""
        digest = digest_of(data)
        self._put(digest, data)
        return digest

    def _put(self, digest: str, data: bytes) -> None:
        if digest not in self._known:
            self._known.add(digest)
            self._frames.append(blob_frame(digest, data))

    def append(self, record: StepRecord, blobs: Mapping[str, bytes] | None = None) -> None:
        """Log one completed step (the next after the last logged one) with the blobs it names."""
        if record.step != self.last_step + 1:
            raise ValueError(f"expected a record for step {self.last_step + 1}, got step {record.step}")
        if not self._steps:
            self._pending_since = time.monotonic()
        self._add(record, blobs or {})
        self.last_step = record.step
        overdue = self.flush_seconds is not None and time.monotonic() - self._pending_since >= self.flush_seconds
        if len(self._steps) >= self.flush_every or overdue:
            self.flush()

    def _add(self, record: StepRecord, blobs: Mapping[str, bytes]) -> None:
        for digest, data in blobs.items():
            self._put(digest, data)
        self._frames.append(frame(RECORD_FRAME, record.model_dump_json(exclude_defaults=True).encode()))
        self._steps.append(record.step)

    @property
    def pending(self) -> int:
        """Records appended but not yet written."""
        return len(self._steps)

    def flush(self) -> None:
        """Write every pending record as one durable segment."""
        if not self._steps:
            return
        if self.fence is not None:
            self.fence()
        key = log_segment_key(self.base_step, self._steps[0], self._steps[-1])
        header = frame(HEADER_FRAME, self.header.model_dump_json().encode())
        data = b"".join([header, *self._frames])
        fault = faults.due("log.write")
        if fault is not None:
            if fault.action == "kill":
                self.storage.write(key, data[: len(data) // 2])  # a torn write: the process dies mid-way
            faults.fire(fault)
        fault = faults.due("log.flush")
        if fault is not None:
            self.storage.write(key, data)  # written, not yet durable
            faults.fire(fault)
        started = time.perf_counter()
        self.storage.write_durable(key, data)
        last = self._steps[-1]
        self._frames, self._steps = [], []
        self.segments_written += 1
        if self.on_flush is not None:
            self.on_flush(last, len(data), time.perf_counter() - started)

    def close(self) -> None:
        self.flush()


def prune_logs(storage: Storage, oldest_kept: int) -> list[int]:
    """Delete the logs of snapshots older than ``oldest_kept`` (the oldest snapshot a prune kept).

    Kept: the newest such log if it runs past ``oldest_kept`` further than any later log (a run
    that died after a snapshot committed, before its log moved over, has those records there
    alone). Returns the base steps of the logs deleted.
    """
    last_steps = {
        base: max((last for _, last, _ in segments(storage, base)), default=base) for base in log_bases(storage)
    }
    later_end = max((end for base, end in last_steps.items() if base >= oldest_kept), default=-1)
    older = sorted(b for b in last_steps if b < oldest_kept)
    deleted = []
    for base in older:
        if base == older[-1] and last_steps[base] > max(later_end, oldest_kept):
            continue
        storage.delete_prefix(log_dir(base))
        log.info("pruned the log after step %d from %s", base, redact_url(storage.url))
        deleted.append(base)
    return deleted
