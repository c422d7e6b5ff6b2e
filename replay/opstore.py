"""Op captures on storage: JSON plus raw bytes, checksummed, next to the op-stream log.

Layout below the run directory (capture format version 1)::

    log/ops/<step:012d>/<label>/rank-<r:05d>/stream.json    ops, values, externals, results (JSON)
    log/ops/<step:012d>/<label>/rank-<r:05d>/values.bin     raw bytes of the kept values, back to back
    log/ops/<step:012d>/<label>/rank-<r:05d>/capture.json   the index, written last (`CaptureIndex`)

A capture exists if and only if its ``capture.json`` exists and validates: it holds the size and
sha256 of the two other objects, the offset, length and crc32c of every kept value, and a sha256
of its own body. A capture whose writer died before the index is *torn*: readers report it and
never use it. Labels (``c<unix ms>-<source>`` by default) sort in the order captures were made.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import crc32c as _crc32c
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from moai_ckpt.dtypes import torch_dtype
from moai_ckpt.errors import CorruptCaptureError, UnsupportedFormatError
from moai_ckpt.format import canonical_json, sha256
from moai_ckpt.layout import (
    CAPTURE_INDEX,
    CAPTURE_STREAM,
    CAPTURE_VALUES,
    OPS,
    capture_dir,
    capture_key,
    capture_step_dir,
    check_label,
    is_capture_label,
    parse_capture_rank,
    parse_step_name,
)
from moai_ckpt.storage import Storage
from replay.log import Placement
from replay.ops import OpStream

CAPTURE_VERSION = 1


class FileEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    size: int = Field(ge=0)
    sha256: str


class CaptureIndex(BaseModel):
    """``capture.json``: what a capture holds, and the checksums that vouch for it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: int = CAPTURE_VERSION
    step: int = Field(ge=1)
    label: str
    rank: int = Field(ge=0)
    world_size: int = Field(ge=1)
    placement: Placement
    created: float
    ops: int = Field(ge=0)
    values: int = Field(ge=0)
    stream: FileEntry
    data: FileEntry
    blobs: dict[str, tuple[int, int, int]] = Field(description="value id -> (offset, length, crc32c) in values.bin")
    checksum: str = Field(default="", description="sha256 of this index's canonical JSON without this field")

    def body_checksum(self) -> str:
        return sha256(canonical_json(self.model_dump(exclude={"checksum"})))


def new_label(source: str) -> str:
    """A label that sorts after every earlier one: ``c<unix ms>-<source>``."""
    return check_label(f"c{int(time.time() * 1000):013d}-{source}")


# -- writing --------------------------------------------------------------------------------------


def write_capture(storage: Storage, stream: OpStream, label: str, placement: Placement) -> CaptureIndex:
    """Store ``stream``: its two data objects, then the index that commits them."""
    step, rank = stream.step, stream.rank
    capture_dir(step, label, rank)  # a step and label a capture can have, checked before anything is written
    body = {
        "version": CAPTURE_VERSION,
        "step": stream.step,
        "rank": stream.rank,
        "world_size": stream.world_size,
        "meta": stream.meta,
        "ops": stream.ops,
        "values": stream.values,
        "externals": {str(k): v for k, v in stream.externals.items()},
        "results": stream.results,
        "finals": stream.finals,
    }
    stream_bytes = json.dumps(body, separators=(",", ":")).encode()
    parts: list[bytes] = []
    blobs: dict[str, tuple[int, int, int]] = {}
    offset = 0
    for vid, tensor in sorted(stream.blobs.items()):
        data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        blobs[str(vid)] = (offset, len(data), _crc32c.crc32c(data))
        parts.append(data)
        offset += len(data)
    data_bytes = b"".join(parts)
    storage.write_durable(capture_key(step, label, rank, CAPTURE_STREAM), stream_bytes)
    storage.write_durable(capture_key(step, label, rank, CAPTURE_VALUES), data_bytes)
    index = CaptureIndex(
        step=stream.step,
        label=label,
        rank=stream.rank,
        world_size=stream.world_size,
        placement=placement,
        created=time.time(),
        ops=len(stream.ops),
        values=len(stream.values),
        stream=FileEntry(size=len(stream_bytes), sha256=sha256(stream_bytes)),
        data=FileEntry(size=len(data_bytes), sha256=sha256(data_bytes)),
        blobs=blobs,
    )
    index = index.model_copy(update={"checksum": index.body_checksum()})
    storage.write_durable(capture_key(step, label, rank, CAPTURE_INDEX), index.model_dump_json().encode())
    return index


# -- listing and reading --------------------------------------------------------------------------


@dataclass(frozen=True)
class CaptureRef:
    """One capture of one step: its label and the ranks that committed it; ``torn``: ranks that did not."""

    step: int
    label: str
    ranks: tuple[int, ...]
    torn: tuple[int, ...] = ()


def list_captures(storage: Storage, step: int | None = None) -> list[CaptureRef]:
    """Every capture in the run directory (of ``step`` only, if given), oldest label first per step."""
    found = []
    for name in storage.list_dirs(OPS):
        captured = parse_step_name(name)
        if captured is None or captured < 1 or (step is not None and captured != step):
            continue  # not a step, or step 0 (no step before it to capture)
        for label in filter(is_capture_label, storage.list_dirs(capture_step_dir(captured))):
            ranks: list[int] = []
            torn: list[int] = []
            for rank_dir in storage.list_dirs(capture_dir(captured, label)):
                rank = parse_capture_rank(rank_dir)
                if rank is None:
                    continue
                committed = storage.exists(capture_key(captured, label, rank, CAPTURE_INDEX))
                (ranks if committed else torn).append(rank)
            found.append(CaptureRef(captured, label, tuple(sorted(ranks)), tuple(sorted(torn))))
    return sorted(found, key=lambda r: (r.step, r.label))


def read_index(storage: Storage, step: int, label: str, rank: int = 0) -> CaptureIndex:
    prefix = capture_dir(step, label, rank)
    key = capture_key(step, label, rank, CAPTURE_INDEX)
    try:
        raw = storage.read(key)
    except FileNotFoundError:
        torn = storage.list(prefix)
        what = "is torn (its writer died before writing capture.json)" if torn else "does not exist"
        raise CorruptCaptureError(
            f"op capture {label} of step {step} (rank {rank}) {what}", url=storage.url, step=step, key=key
        ) from None
    try:
        version = json.loads(raw).get("version")
    except (ValueError, AttributeError):
        version = None
    if isinstance(version, int) and version != CAPTURE_VERSION:
        raise UnsupportedFormatError(
            f"op capture format version {version} is not one this moai-ckpt reads ({CAPTURE_VERSION})"
            + ("; upgrade moai-ckpt" if version > CAPTURE_VERSION else ""),
            url=storage.url,
            key=key,
        )
    try:
        index = CaptureIndex.model_validate_json(raw)
    except ValidationError as exc:
        raise CorruptCaptureError(f"capture.json does not validate: {exc}", url=storage.url, key=key) from None
    if index.checksum != index.body_checksum():
        raise CorruptCaptureError("capture.json does not match its own checksum", url=storage.url, key=key)
    if (index.step, index.label, index.rank) != (step, label, rank):
        raise CorruptCaptureError(
            f"capture.json names step {index.step}, label {index.label}, rank {index.rank}: not where it is",
            url=storage.url,
            key=key,
        )
    return index


def _read_checked(storage: Storage, key: str, entry: FileEntry) -> bytes:
    try:
        data = storage.read(key)
    except FileNotFoundError:
        raise CorruptCaptureError("object named by capture.json is missing", url=storage.url, key=key) from None
    if len(data) != entry.size or sha256(data) != entry.sha256:
        raise CorruptCaptureError(
            f"object does not match capture.json ({len(data)} bytes, {entry.size} recorded; sha256 differs)",
            url=storage.url,
            key=key,
        )
    return data


def read_capture(storage: Storage, step: int, label: str, rank: int = 0, *, blobs: bool = True) -> OpStream:
    """Read and check one rank's capture (with the kept values' bytes unless ``blobs=False``)."""
    index = read_index(storage, step, label, rank)
    prefix = capture_dir(step, label, rank)
    body = json.loads(_read_checked(storage, capture_key(step, label, rank, CAPTURE_STREAM), index.stream))
    stream = OpStream(
        step=body["step"],
        rank=body["rank"],
        world_size=body["world_size"],
        meta={**body["meta"], "label": label, "placement": index.placement.model_dump()},
        ops=body["ops"],
        values=body["values"],
        externals={int(k): v for k, v in body["externals"].items()},
        results=body["results"],
        finals=body["finals"],
    )
    if len(stream.ops) != index.ops or len(stream.values) != index.values:
        raise CorruptCaptureError("stream.json disagrees with capture.json's counts", url=storage.url, key=prefix)
    if blobs:
        stream.blobs = _blobs(storage, capture_key(step, label, rank, CAPTURE_VALUES), index, stream)
    return stream


def _blobs(storage: Storage, key: str, index: CaptureIndex, stream: OpStream) -> dict[int, torch.Tensor]:
    data = _read_checked(storage, key, index.data)
    out: dict[int, torch.Tensor] = {}
    for name, (offset, length, crc) in index.blobs.items():
        vid = int(name)
        chunk = data[offset : offset + length]
        if len(chunk) != length or _crc32c.crc32c(chunk) != crc:
            raise CorruptCaptureError(f"kept value {vid} fails its crc32c", url=storage.url, key=key)
        meta = stream.values[vid]
        dtype = torch_dtype(meta["dtype"])
        shape = meta["shape"]
        if length:
            out[vid] = torch.frombuffer(bytearray(chunk), dtype=torch.uint8).view(dtype).reshape(shape)
        else:
            out[vid] = torch.empty(shape, dtype=dtype)
    return out


def latest_label(storage: Storage, step: int, *, excluding: str | None = None) -> str | None:
    refs = [r for r in list_captures(storage, step) if r.ranks and r.label != excluding]
    return refs[-1].label if refs else None


def describe(index: CaptureIndex) -> dict[str, Any]:
    return {
        "step": index.step,
        "label": index.label,
        "rank": index.rank,
        "world_size": index.world_size,
        "device": index.placement.device_name or index.placement.device_type,
        "ops": index.ops,
        "values": index.values,
        "bytes": index.stream.size + index.data.size,
    }
