"""The on-storage format: paths, versioned records and their checks.

Layout of a run directory::

    run.json                         run identity (RunInfo)
    snapshots/<step:012d>/           one zarr v3 group per snapshot
        zarr.json                    group metadata (attributes.moai_ckpt: format version, step)
        <object>/zarr.json           one sub-group per top-level state entry
        <object>/<name>/zarr.json    one zarr v3 array per stored tensor (bytes + crc32c codecs)
        <object>/<name>/c/<i>/...    chunks: little-endian words followed by their crc32c
        manifest.json                state tree (JSON, tensors referenced by array path)
        ranks/<rank:05d>.json        per-rank shard index: chunks written, with sizes and crc32c
        claim.json                   step claim: which writer (owner, lease epoch) is writing it
        commit.json                  commit marker, written last by the coordinator
    log/<base:012d>/<a>-<b>.seg      op-stream log: records of steps a..b after the snapshot at
                                     base, in immutable framed segments (the replay package)
    reports/replay-<time>-from-<base>.json   what each replay after a restart checked
    lease/<epoch:012d>.json          the run's writer lease, one object per epoch (LeaseRecord)

A snapshot exists if and only if ``commit.json`` exists, parses, carries a known format version,
matches its own checksum and names the step of its directory. The marker holds the sha256 of the
manifest and of every rank index, so nothing it vouches for can change unnoticed.

Names are strict: a step or log directory is exactly twelve ASCII digits, a log segment
``<12 digits>-<12 digits>.seg``, a lease ``<12 digits>.json``; anything else below ``snapshots/``,
``log/`` or ``lease/`` is not ours and is ignored (with a warning, once).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import pydantic_core
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from moai_ckpt.errors import ChecksumError, CorruptSnapshotError, MoaiCkptError, UnsupportedFormatError
from moai_ckpt.keys import check_key, warn_once

#: the newest snapshot format this code reads and the one it writes (1: no rank-local state)
FORMAT_VERSION = 2
SNAPSHOTS = "snapshots"
LOG = "log"
RUN_INFO = "run.json"
REPORTS = "reports"
MANIFEST = "manifest.json"
COMMIT = "commit.json"
RANKS = "ranks"
CLAIM = "claim.json"
LEASE = "lease"
STEP_DIGITS = 12

_STEP_NAME = re.compile(r"[0-9]{12}", re.ASCII)
_SEGMENT_NAME = re.compile(r"([0-9]{12})-([0-9]{12})\.seg", re.ASCII)
_LEASE_NAME = re.compile(r"([0-9]{12})\.json", re.ASCII)
#: names below ``log/`` that are ours but not a log (moai_ckpt.run.quarantine, replay.opstore)
_LOG_NON_STEPS = frozenset({"quarantine", "ops"})


def snapshot_dir(step: int) -> str:
    if step < 0 or step >= 10**STEP_DIGITS:
        raise ValueError(f"step must be in [0, 1e{STEP_DIGITS}), got {step}")
    return f"{SNAPSHOTS}/{step:0{STEP_DIGITS}d}"


def parse_step_name(name: str) -> int | None:
    """The step a directory name spells (exactly twelve ASCII digits), or None.

    ``str.isdigit`` is not enough: ``"00000000001\u00b2"`` is "digits" to it, yet no step.
    """
    return int(name) if _STEP_NAME.fullmatch(name) else None


def parse_snapshot_dir(name: str) -> int | None:
    """The step of a ``snapshots/`` entry, or None for anything that is not one."""
    return parse_step_name(name)


def log_dir(base_step: int) -> str:
    """The folder of the log records that follow the snapshot at ``base_step``."""
    return f"{LOG}/{base_step:0{STEP_DIGITS}d}"


def log_segment_key(base_step: int, first: int, last: int) -> str:
    return f"{log_dir(base_step)}/{first:0{STEP_DIGITS}d}-{last:0{STEP_DIGITS}d}.seg"


def parse_log_segment(name: str) -> tuple[int, int] | None:
    """(first, last) step of a log segment's file name, or None for anything else."""
    m = _SEGMENT_NAME.fullmatch(name)
    if m is None or int(m.group(1)) > int(m.group(2)):
        return None
    return int(m.group(1)), int(m.group(2))


def steps_in(names: Iterable[str], where: str, *, ignore: Iterable[str] = ()) -> list[int]:
    """Steps of the entries of a ``snapshots/`` or ``log/`` listing, ascending.

    Anything that is not a twelve-digit name is ignored with a warning (once per name), apart
    from the names in ``ignore`` that are known to live there.
    """
    skip = set(ignore)
    steps = []
    for name in names:
        step = parse_step_name(name)
        if step is not None:
            steps.append(step)
        elif name not in skip:
            warn_once(where, name, f"not a step (steps are {STEP_DIGITS} ASCII digits)")
    return sorted(steps)


def snapshot_steps(names: Iterable[str], url: str) -> list[int]:
    """Steps of a ``snapshots/`` listing (see `steps_in`)."""
    return steps_in(names, f"{url}/{SNAPSHOTS}")


def log_base_steps(names: Iterable[str], url: str) -> list[int]:
    """Base steps of a ``log/`` listing (see `steps_in`)."""
    return steps_in(names, f"{url}/{LOG}", ignore=_LOG_NON_STEPS)


def claim_key(step: int) -> str:
    """The claim a writer makes, by exclusive create, before it writes anything of ``step``."""
    return f"{snapshot_dir(step)}/{CLAIM}"


def lease_key(epoch: int) -> str:
    if epoch < 1 or epoch >= 10**STEP_DIGITS:
        raise ValueError(f"a lease epoch must be in [1, 1e{STEP_DIGITS}), got {epoch}")
    return f"{LEASE}/{epoch:0{STEP_DIGITS}d}.json"


def parse_lease_key(key: str) -> int | None:
    """The epoch of a ``lease/`` object's key, or None for anything else."""
    folder, _, name = key.rpartition("/")
    m = _LEASE_NAME.fullmatch(name)
    return int(m.group(1)) if folder == LEASE and m is not None and int(m.group(1)) >= 1 else None


def rank_index_key(step: int, rank: int) -> str:
    return f"{snapshot_dir(step)}/{RANKS}/{rank:05d}.json"


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def canonical_json(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    format_version: int = FORMAT_VERSION

    @field_validator("format_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v > FORMAT_VERSION or v < 1:
            raise UnsupportedFormatError(
                f"format version {v} is not supported by this moai-ckpt (reads up to "
                f"{FORMAT_VERSION}); upgrade moai-ckpt to read it"
            )
        return v


class ArrayRecord(BaseModel):
    """One stored tensor: a zarr array below the snapshot group."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str = Field(description="key of the array group, relative to the snapshot directory")
    dtype: str = Field(description="logical torch dtype name, e.g. bfloat16")
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    device: str = Field("cpu", description="device the tensor lived on when saved")

    @field_validator("path")
    @classmethod
    def _safe_path(cls, v: str) -> str:
        return check_key(v)

    @field_validator("shape", "chunks")
    @classmethod
    def _non_negative(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(d < 0 for d in v):
            raise ValueError("dimensions must be non-negative")
        return v


class ObjectRecord(BaseModel):
    """One top-level entry of the saved state and how it is restored."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: str = Field(description="module, optimizer, stateful, generator, numpy_rng, python_rng, tensor, json")
    type: str = Field(description="qualified type name when saved, for messages")
    tree: Any = Field(description="encoded state tree; tensors are {'$tensor': array path}")


class Manifest(_Record):
    """What a snapshot holds: the state tree and its arrays."""

    step: int
    created: str
    objects: dict[str, ObjectRecord]
    arrays: dict[str, ArrayRecord]
    world_size: int = 1
    device_types: list[str] = Field(default_factory=list)
    plan: dict[str, Any] | None = None
    info: dict[str, Any] = Field(default_factory=dict)
    rank_local: dict[str, dict[int, str]] = Field(
        default_factory=dict,
        description="format 2: array -> saving rank -> the array holding that rank's copy (the ranks' "
        "copies differed; the lowest rank's is the array itself)",
    )

    @model_validator(mode="after")
    def _rank_local_copies_are_arrays(self) -> Manifest:
        for name, copies in self.rank_local.items():
            if name not in self.arrays or len(copies) < 2 or copies.get(min(copies)) != name:
                raise ValueError(f"rank-local array {name!r}: the lowest rank's copy must be the listed array itself")
            for rank, path in copies.items():
                if not 0 <= rank < self.world_size or path not in self.arrays:
                    raise ValueError(f"rank-local array {name!r}: rank {rank}'s copy {path!r} is not a listed array")
                if self.arrays[path].dtype != self.arrays[name].dtype:
                    raise ValueError(f"rank-local array {name!r}: rank {rank}'s copy has another dtype")
        return self


class ChunkEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    index: tuple[int, ...]
    nbytes: int = Field(ge=0, description="encoded size: data plus the 4-byte crc32c")
    crc32c: int = Field(ge=0, lt=2**32)


class RankIndex(_Record):
    """What one rank wrote for one snapshot."""

    step: int
    rank: int = Field(ge=0)
    world_size: int = Field(ge=1)
    chunks: dict[str, list[ChunkEntry]] = Field(description="array path -> chunks written")
    bytes_written: int = 0
    device_type: str = "cpu"


class RankRef(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    rank: int
    key: str
    sha256: str

    @field_validator("key")
    @classmethod
    def _safe_key(cls, v: str) -> str:
        return check_key(v)


class CommitBody(_Record):
    step: int
    created: str
    manifest_sha256: str
    ranks: list[RankRef]
    world_size: int
    total_bytes: int
    array_count: int
    device_types: list[str]
    writer: dict[str, str]


class CommitMarker(BaseModel):
    """The commit marker: a body and the sha256 of its canonical JSON."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    body: CommitBody
    checksum: str

    @classmethod
    def seal(cls, body: CommitBody) -> CommitMarker:
        return cls(body=body, checksum=sha256(canonical_json(body.model_dump(mode="json"))))

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_json(), indent=1, sort_keys=True).encode()


def load_commit(data: bytes, *, url: str, step: int) -> CommitMarker:
    """Parse and validate a commit marker read from ``snapshots/<step>/commit.json``.

    Anything malformed (not JSON, too deeply nested, fields of the wrong type) is a
    `CorruptSnapshotError`: the snapshot is not committed, and nothing else breaks.
    """
    key = f"{snapshot_dir(step)}/{COMMIT}"
    try:
        # pydantic's JSON parser bounds the nesting depth (the stdlib's raises RecursionError)
        raw = pydantic_core.from_json(data)
        body = raw.get("body") if isinstance(raw, dict) else None
        version = body.get("format_version", FORMAT_VERSION) if isinstance(body, dict) else None
        if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
            raise UnsupportedFormatError(
                f"snapshot written in format version {version}; this moai-ckpt reads up to "
                f"{FORMAT_VERSION}: upgrade moai-ckpt",
                url=url,
                step=step,
            )
        marker = CommitMarker.model_validate(raw)
    except UnsupportedFormatError:
        raise
    except (ValueError, ValidationError, RecursionError) as exc:
        raise CorruptSnapshotError(f"commit marker does not parse: {exc}", url=url, step=step, key=key) from None
    expected = sha256(canonical_json(marker.body.model_dump(mode="json")))
    if marker.checksum != expected:
        raise ChecksumError("commit marker checksum mismatch", url=url, step=step, key=key)
    if marker.body.step != step:
        raise CorruptSnapshotError(f"commit marker names step {marker.body.step}", url=url, step=step, key=key)
    return marker


def load_record(model: type[Any], data: bytes, *, url: str, step: int, key: str) -> Any:
    """Parse a JSON record (manifest, rank index), mapping failures to moai-ckpt errors.

    A validator that raised one of our errors (an unsafe key, an unknown format version) is
    re-raised as that error with the URL, step and key filled in.
    """
    try:
        return model.model_validate_json(data)
    except ValidationError as exc:
        for err in exc.errors():
            cause = err.get("ctx", {}).get("error")
            if isinstance(cause, MoaiCkptError):
                message = str(cause).split(" [", 1)[0]
                raise type(cause)(message, url=url, step=step, key=key) from None
        raise CorruptSnapshotError(f"{model.__name__} does not validate: {exc}", url=url, step=step, key=key) from None


class RunInfo(BaseModel):
    """``run.json``: who this run is.

    Written by whoever can write the storage, so it is data, never an instruction: the CLI runs
    the function it names only when the user trusts it (docs/security.md).
    """

    model_config = ConfigDict(extra="allow")

    format_version: int = FORMAT_VERSION
    run_id: str
    created: str
    entrypoint: str | None = Field(default=None, description="the training function (module:function), as in entry")
    entry: dict[str, Any] | None = Field(
        default=None,
        description="the training function to re-run for a restore: function, and its JSON arguments args and "
        "kwargs, with secret-looking ones replaced by {'$not_recorded': name, 'reason': ...} (moai_ckpt.entry)",
    )
    versions: dict[str, str] = Field(default_factory=dict)


class WriterIdentity(BaseModel):
    """The process that writes a run: enough to tell, on its host, whether it still lives."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    owner: str = Field(min_length=1, max_length=64, description="random id of the writing process")
    host: str = Field(max_length=255)
    machine: str = Field(default="", max_length=255, description="boot id and pid namespace: one pid space")
    pid: int = Field(ge=0)
    pid_start: int | None = Field(default=None, description="the process's start time in clock ticks (Linux)")
    started: str = Field(max_length=64, description="when the process took the lease, ISO 8601")
    job: str | None = Field(default=None, max_length=255, description="TORCHELASTIC_RUN_ID, when under torchrun")
    restart: int | None = Field(default=None, ge=0, description="TORCHELASTIC_RESTART_COUNT")

    def describe(self) -> str:
        job = f", torchelastic job {self.job!r} (restart {self.restart})" if self.job else ""
        return f"host {self.host}, pid {self.pid}, started {self.started}{job}"


class LeaseRecord(_Record):
    """``lease/<epoch>.json``: the run's writer for one epoch; the highest epoch holds the run."""

    epoch: int = Field(ge=1)
    writer: WriterIdentity
    renewed_at: float = Field(description="Unix time of the last renewal")
    expires_at: float = Field(description="Unix time after which the lease may be taken over")
    ttl_s: float = Field(gt=0)
    fenced_until: float = Field(
        default=0.0, description="until this Unix time, claims of older epochs may belong to a live writer"
    )
    released: bool = Field(default=False, description="the writer closed the run and gave the lease up")


class ClaimRecord(_Record):
    """``snapshots/<step>/claim.json``: the writer (and lease epoch) writing that step."""

    step: int = Field(ge=0)
    epoch: int = Field(ge=1)
    writer: WriterIdentity
    created_at: float
