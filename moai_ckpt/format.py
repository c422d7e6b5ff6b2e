"""The on-storage records: versioned pydantic models of what a run directory holds, and their checks.

Where each record lives is `moai_ckpt.layout`'s business; this module says what it contains:
the `Manifest` (the state tree and its arrays), each rank's `RankIndex`, the `CommitMarker`, the
run's `RunInfo`, and the fencing records (`LeaseRecord`, `ClaimRecord`). Every record read back
is untrusted: `load_commit` and `load_record` turn anything malformed into a moai-ckpt error that
names its URL, step and key.

A snapshot exists if and only if its commit marker exists, parses, carries a known format
version, matches its own checksum and names the step of its directory. The marker holds the
sha256 of the manifest and of every rank index, so nothing it vouches for can change unnoticed.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any

import pydantic_core
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from moai_ckpt.errors import ChecksumError, CorruptSnapshotError, MoaiCkptError, UnsupportedFormatError
from moai_ckpt.keys import check_key
from moai_ckpt.layout import commit_key

#: the newest snapshot format this code reads and the one it writes (1: no rank-local state;
#: 2: chunk keys with the "/" separator, read as each zarr.json declares)
FORMAT_VERSION = 3


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
    key = commit_key(step)
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
