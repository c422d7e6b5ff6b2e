"""The op-stream log: one record per completed step after a snapshot, in immutable segments.

Layout below the run directory::

    log/<base step:012d>/<first:012d>-<last:012d>.seg   records of steps first..last after the
                                                         snapshot at base, framed (see below)
    log/blobs/<aa>/<sha256>                              content-addressed values (RNG states,
                                                         batches that are not indexable)

Every segment is written whole, once: no append, no rename, so object stores work as local disks
do. A record is durable when `LogWriter.append` returns under the default policy
(``flush_every=1``); with group commit (``flush_every=N`` or ``flush_seconds=T``) at most the last
N-1 records, or T seconds of them, can be lost in a crash.

Framing: ``MLOG | length (u32 LE) | crc32c(payload) (u32 LE) | payload (JSON)``. Reading stops at
the first damaged frame: a frame cut short, or a bad last frame of the newest segment, is a torn
tail (the writer died mid-write) and is dropped; damage anywhere else is corruption, and the
records before it are all a replay may use.
"""

from __future__ import annotations

import hashlib
import re
import struct
import time
from dataclasses import dataclass, field
from typing import Any

import crc32c as _crc32c
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from moai_ckpt.errors import CorruptSnapshotError
from moai_ckpt.format import LOG, STEP_DIGITS
from moai_ckpt.storage import Storage

MAGIC = b"MLOG"
HEADER = struct.Struct("<4sII")
MAX_RECORD = 64 << 20
RECORD_VERSION = 1
_SEGMENT = re.compile(rf"^(\d{{{STEP_DIGITS}}})-(\d{{{STEP_DIGITS}}})\.seg$")


class CorruptLogError(CorruptSnapshotError):
    """A log record or blob fails its checks (not a torn tail): replay must stop before it."""


class Digests(BaseModel):
    """What a step produced, for checking its replay."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    loss: float | None = None
    grad_norm: float | None = None
    state: str | None = Field(default=None, description="a cheap digest of the updated state")


class StepRecord(BaseModel):
    """One completed step: its logical inputs and its result digests.

    Samples are *global* indices (see `moai_ckpt.GlobalSampler`), never ranks: a log written on
    8 ranks replays on 3.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: int = RECORD_VERSION
    step: int = Field(ge=1, description="the state after this record is the state at `step`")
    samples: list[int] | None = Field(default=None, description="global sample indices of the batch")
    batch: str | None = Field(default=None, description="blob digest of the batch, when not indexable")
    rng: dict[str, str] = Field(default_factory=dict, description="generator -> blob digest of its state at step start")
    hparams: dict[str, Any] = Field(default_factory=dict, description="scalars in force: lr per group, loss scale...")
    digests: Digests = Field(default_factory=Digests)
    wall_time: float | None = None


def frame(payload: bytes) -> bytes:
    if len(payload) > MAX_RECORD:
        raise ValueError(f"log record of {len(payload)} bytes exceeds {MAX_RECORD}")
    return HEADER.pack(MAGIC, len(payload), _crc32c.crc32c(payload)) + payload


@dataclass(frozen=True)
class Damage:
    """The first damaged frame of a segment: its byte offset and what is wrong."""

    offset: int
    reason: str
    at_end: bool  # nothing valid could follow: the shape of a write cut short


def unframe(data: bytes) -> tuple[list[bytes], Damage | None]:
    """Split a segment into payloads, stopping at the first damaged frame."""
    out: list[bytes] = []
    offset = 0
    while offset < len(data):
        rest = data[offset:]
        if len(rest) < HEADER.size:
            return out, Damage(offset, "incomplete frame header", True)
        magic, length, crc = HEADER.unpack_from(data, offset)
        if magic != MAGIC or length > MAX_RECORD:
            return out, Damage(offset, "bad frame header", not any(rest))  # zeros: unwritten blocks
        end = offset + HEADER.size + length
        if end > len(data):
            return out, Damage(offset, f"frame of {length} bytes cut short", True)
        payload = data[offset + HEADER.size : end]
        if _crc32c.crc32c(payload) != crc:
            return out, Damage(offset, "frame crc32c mismatch", end == len(data))
        out.append(payload)
        offset = end
    return out, None


def segment_prefix(base_step: int) -> str:
    return f"{LOG}/{base_step:0{STEP_DIGITS}d}"


def segment_key(base_step: int, first: int, last: int) -> str:
    return f"{segment_prefix(base_step)}/{first:0{STEP_DIGITS}d}-{last:0{STEP_DIGITS}d}.seg"


def blob_key(digest: str) -> str:
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise CorruptLogError(f"not a blob digest: {digest!r}", key=digest)
    return f"{LOG}/blobs/{digest[:2]}/{digest}"


@dataclass
class LogContents:
    """What a log holds after a snapshot: valid records in order, and why reading stopped."""

    base_step: int
    records: list[StepRecord] = field(default_factory=list)
    torn_tail: str | None = None  # a write cut short at the end: expected after a crash, dropped
    corruption: CorruptLogError | None = None  # replay must stop before this

    @property
    def last_step(self) -> int:
        return self.records[-1].step if self.records else self.base_step


def segments(storage: Storage, base_step: int) -> list[tuple[int, int, str]]:
    """(first, last, key) of every segment after ``base_step``, in order."""
    prefix = segment_prefix(base_step)
    found = []
    for key in storage.list(prefix):
        match = _SEGMENT.match(key.rsplit("/", 1)[-1])
        if match is not None:
            found.append((int(match.group(1)), int(match.group(2)), key))
    return sorted(found)


def read_log(storage: Storage, base_step: int) -> LogContents:
    """Read the records after the snapshot at ``base_step``, checking framing and continuity.

    Segments may overlap (a segment rewritten after a torn tail, with the old one not yet
    deleted): a step seen twice must carry the same record.
    """
    contents = LogContents(base_step)
    by_step: dict[int, bytes] = {}
    found = segments(storage, base_step)
    for i, (_first, _last, key) in enumerate(found):
        payloads, damage = unframe(storage.read(key))
        for payload in payloads:
            problem = _take(contents, by_step, payload, storage.url, key)
            if problem is not None:
                contents.corruption = problem
                return contents
        if damage is not None:
            where = f"{damage.reason} at byte {damage.offset} after step {contents.last_step}"
            if damage.at_end and i == len(found) - 1:
                contents.torn_tail = f"{key}: {where}"
            else:
                contents.corruption = CorruptLogError(
                    f"log record damaged ({where}); replay stops at step {contents.last_step}", url=storage.url, key=key
                )
            return contents
    return contents


def _take(
    contents: LogContents, by_step: dict[int, bytes], payload: bytes, url: str, key: str
) -> CorruptLogError | None:
    try:
        record = StepRecord.model_validate_json(payload)
    except ValidationError as exc:
        return CorruptLogError(f"log record does not validate: {exc}", url=url, key=key)
    if record.step in by_step:
        if by_step[record.step] != payload:
            return CorruptLogError(f"two different records for step {record.step}", url=url, key=key)
        return None
    if record.step != contents.last_step + 1:
        return CorruptLogError(
            f"log jumps from step {contents.last_step} to {record.step}: records are missing", url=url, key=key
        )
    by_step[record.step] = payload
    contents.records.append(record)
    return None


class LogWriter:
    """Appends the records of steps after the snapshot at ``base_step``.

    Args:
        storage: the run directory.
        base_step: the committed snapshot the records continue from.
        flush_every: write a segment every this many records (1: each record durable on return).
        flush_seconds: also write a segment once the oldest unwritten record is this old.
    """

    def __init__(
        self, storage: Storage, base_step: int, *, flush_every: int = 1, flush_seconds: float | None = None
    ) -> None:
        if flush_every < 1:
            raise ValueError("flush_every must be at least 1")
        self.storage = storage
        self.base_step = base_step
        self.flush_every = flush_every
        self.flush_seconds = flush_seconds
        self._pending: list[tuple[int, bytes]] = []
        self._pending_since = 0.0
        self._blobs: set[str] = set()
        self._unsynced: list[str] = []  # blobs written since the last segment, made durable with it
        self.last_step = base_step

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
        writer.last_step = contents.last_step
        for first, last, key in segments(storage, base_step):
            if last > contents.last_step:  # the torn segment
                kept = [r for r in contents.records if first <= r.step]
                if kept:
                    writer._write([(r.step, r.model_dump_json().encode()) for r in kept])
                storage.delete([key])
        return writer, contents

    def append(self, record: StepRecord) -> None:
        """Log one completed step (the next after the last logged one)."""
        if record.step != self.last_step + 1:
            raise ValueError(f"expected a record for step {self.last_step + 1}, got step {record.step}")
        if not self._pending:
            self._pending_since = time.monotonic()
        self._pending.append((record.step, record.model_dump_json().encode()))
        self.last_step = record.step
        overdue = self.flush_seconds is not None and time.monotonic() - self._pending_since >= self.flush_seconds
        if len(self._pending) >= self.flush_every or overdue:
            self.flush()

    def flush(self) -> None:
        """Write every pending record as one durable segment."""
        if self._pending:
            self._write(self._pending)
            self._pending = []

    def _write(self, records: list[tuple[int, bytes]]) -> None:
        key = segment_key(self.base_step, records[0][0], records[-1][0])
        self.storage.write(key, b"".join(frame(payload) for _, payload in records))
        self.storage.barrier([key, *self._unsynced])  # the records' blobs become durable with them
        self._unsynced = []

    def put_blob(self, data: bytes) -> str:
        """Store ``data`` once under its sha256 and return the digest."""
        digest = hashlib.sha256(data).hexdigest()
        if digest not in self._blobs:
            key = blob_key(digest)
            if not self.storage.exists(key):
                self.storage.write(key, data)
                self._unsynced.append(key)
            self._blobs.add(digest)
        return digest

    def close(self) -> None:
        self.flush()
        if self._unsynced:
            self.storage.barrier(self._unsynced)
            self._unsynced = []


def get_blob(storage: Storage, digest: str) -> bytes:
    """Read a blob and check it against its digest."""
    key = blob_key(digest)
    try:
        data = storage.read(key)
    except FileNotFoundError:
        raise CorruptLogError("blob named by the log is missing", url=storage.url, key=key) from None
    if hashlib.sha256(data).hexdigest() != digest:
        raise CorruptLogError("blob does not match its digest", url=storage.url, key=key)
    return data


def prune_log(storage: Storage, oldest_kept_snapshot: int) -> list[int]:
    """Delete the logs after snapshots older than ``oldest_kept_snapshot`` and unreferenced blobs.

    Returns the base steps whose logs were deleted.
    """
    bases = sorted(int(name) for name in storage.list_dirs(LOG) if name.isdigit() and len(name) == STEP_DIGITS)
    doomed = [b for b in bases if b < oldest_kept_snapshot]
    for base in doomed:
        storage.delete_prefix(segment_prefix(base))
    referenced: set[str] = set()
    for base in bases:
        if base in doomed:
            continue
        for record in read_log(storage, base).records:
            referenced |= set(record.rng.values()) | ({record.batch} if record.batch else set())
    stale = [k for k in storage.list(f"{LOG}/blobs") if k.rsplit("/", 1)[-1] not in referenced]
    storage.delete(stale)
    return doomed
