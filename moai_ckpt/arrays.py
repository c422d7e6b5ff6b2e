"""Tensors as zarr v3 arrays: metadata, chunk layout, encoding and checked decoding.

The encoding is exactly zarr v3's ``bytes`` codec (little-endian, C order) followed by its
``crc32c`` codec, so plain zarr reads every array. moai-ckpt writes and reads the chunk objects
itself, straight from and into tensor memory: no intermediate buffers, no event loop, vectored
I/O, and each chunk's crc32c computed once and recorded in the rank index as well as appended.

Tensors are chunked along their first dimension only, ``chunk_bytes`` at most per chunk (at least
one row). Sharded tensors (a later layer) use the same grid with boundaries on shard boundaries.

Array records read back from storage are untrusted: `check_layout` checks one with arithmetic
alone (dtype, chunk grid, chunk count, bytes against a limit) before anything is listed or
allocated from it, and `check_array_metadata` compares the whole stored ``zarr.json`` with the
document the record implies.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import crc32c as _crc32c
import torch

from moai_ckpt.dtypes import StoredDtype, from_name
from moai_ckpt.errors import ChecksumError, LimitExceededError, ManifestMismatchError, MoaiCkptError
from moai_ckpt.format import ArrayRecord

DEFAULT_CHUNK_BYTES = 64 << 20
MAX_DIM = 2**63 - 1  # torch sizes are 64-bit
CRC = struct.Struct("<I")
MOAI_ATTR = "moai_ckpt"
#: the separator of the chunk keys this writer makes: ``<array>/c.0.0`` sits beside ``zarr.json``
CHUNK_SEPARATOR = "."
#: the separators of zarr v3's ``default`` chunk key encoding, the one this format uses; snapshots
#: of moai-ckpt before 0.x used ``/`` (``<array>/c/0/0``) and are read as their ``zarr.json`` says
SEPARATORS = ("/", ".")


def choose_chunks(shape: tuple[int, ...], itemsize: int, chunk_bytes: int) -> tuple[int, ...]:
    """Chunk shape: whole rows of the first dimension, about ``chunk_bytes`` (at least one row).

    zarr stores edge chunks at full size, padded, so rows are spread evenly over the fewest
    chunks that respect the limit: the padding stays under one row per chunk.
    """
    if not shape:
        return ()
    row_bytes = math.prod(shape[1:]) * itemsize
    max_rows = max(1, chunk_bytes // max(1, row_bytes))
    count = max(1, math.ceil(shape[0] / max_rows))
    rows = max(1, math.ceil(shape[0] / count))
    return (rows, *(max(1, d) for d in shape[1:]))


@dataclass(frozen=True)
class ChunkSpan:
    """One chunk: its grid index, its byte range in the C-order tensor, and the zero padding
    that fills an edge chunk to the full chunk size zarr expects."""

    index: tuple[int, ...]
    start: int
    stop: int
    pad: int = 0

    @property
    def encoded_size(self) -> int:
        return self.stop - self.start + self.pad + CRC.size


def chunk_count(shape: tuple[int, ...], chunks: tuple[int, ...]) -> int:
    """How many chunks an array chunked along dimension 0 has, by arithmetic (nothing is listed)."""
    if not shape:
        return 1
    if math.prod(shape) == 0:
        return 0
    return -(-shape[0] // chunks[0])


def check_layout(record: ArrayRecord, *, limit: int, url: str, step: int, key: str) -> StoredDtype:
    """Refuse an array record this reader cannot have written, before anything is built from it.

    Only arithmetic: the dtype is known, the chunk grid cuts dimension 0 alone (as
    `choose_chunks` does), every size fits torch's 64-bit sizes, and the array's bytes are at
    most ``limit``. A record that passes has `chunk_count` chunks, each of at most ``limit`` bytes.

    Raises:
        UnsupportedFormatError: an unknown dtype.
        ManifestMismatchError: a chunk grid this format never writes.
        LimitExceededError: the array would be larger than ``limit`` bytes.
    """
    try:
        stored = from_name(record.dtype)
    except MoaiCkptError as exc:
        raise type(exc)(str(exc), url=url, step=step, key=key) from None
    shape, chunks = record.shape, record.chunks
    expected_tail = tuple(max(1, d) for d in shape[1:])
    if len(chunks) != len(shape) or (shape and (chunks[0] < 1 or chunks[1:] != expected_tail)):
        raise ManifestMismatchError(
            f"chunk shape {list(chunks)} does not cut shape {list(shape)} along dimension 0 alone",
            url=url,
            step=step,
            key=key,
        )
    nbytes = math.prod(shape) * stored.itemsize
    if any(d > MAX_DIM for d in (*shape, *chunks)) or math.prod(max(1, d) for d in shape) > MAX_DIM:
        raise ManifestMismatchError(f"shape {list(shape)} exceeds torch's 64-bit sizes", url=url, step=step, key=key)
    if nbytes > limit:
        raise LimitExceededError(
            f"array of shape {list(shape)} ({record.dtype}) would take {nbytes} bytes, more than the "
            f"limit of {limit} (raise CheckpointerOptions.max_array_bytes if the snapshot is trusted)",
            url=url,
            step=step,
            key=key,
        )
    return stored


def chunk_spans(shape: tuple[int, ...], chunks: tuple[int, ...], itemsize: int) -> Iterator[ChunkSpan]:
    """The chunks of an array chunked along dimension 0, in order. Empty arrays have none."""
    if not shape:
        yield ChunkSpan((), 0, itemsize)
        return
    if math.prod(shape) == 0:
        return
    row_bytes = math.prod(shape[1:]) * itemsize
    rows = chunks[0]
    trailing = (0,) * (len(shape) - 1)
    for i in range(math.ceil(shape[0] / rows)):
        lo, hi = i * rows, min(shape[0], (i + 1) * rows)
        yield ChunkSpan((i, *trailing), lo * row_bytes, hi * row_bytes, (lo + rows - hi) * row_bytes)


def array_metadata(record: ArrayRecord, stored: StoredDtype, separator: str = CHUNK_SEPARATOR) -> dict[str, Any]:
    """The zarr v3 ``zarr.json`` document for a stored tensor (chunk keys with ``separator``)."""
    fill: Any = 0
    if stored.zarr == "bool":
        fill = False
    elif stored.zarr.startswith("float"):
        fill = 0.0
    elif stored.zarr.startswith("complex"):
        fill = [0.0, 0.0]
    bytes_codec: dict[str, Any] = {"name": "bytes"}
    if stored.itemsize > 1:
        bytes_codec["configuration"] = {"endian": "little"}
    attributes: dict[str, Any] = {MOAI_ATTR: {"dtype": stored.logical}}
    if stored.reinterpreted:
        attributes[MOAI_ATTR]["note"] = (
            f"{stored.logical} stored as raw {stored.zarr} words; reinterpret to read values"
        )
    return {
        "zarr_format": 3,
        "node_type": "array",
        "shape": list(record.shape),
        "data_type": stored.zarr,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(record.chunks)}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": separator}},
        "fill_value": fill,
        "codecs": [bytes_codec, {"name": "crc32c"}],
        "attributes": attributes,
        "storage_transformers": [],
    }


def group_metadata(attributes: dict[str, Any] | None = None) -> bytes:
    return encode({"zarr_format": 3, "node_type": "group", "attributes": attributes or {}})


def encode(document: Any) -> bytes:
    """A JSON document as stored: compact, by the C encoder (``indent`` would take the Python one)."""
    return json.dumps(document, separators=(",", ":")).encode()


def check_array_metadata(raw: bytes, record: ArrayRecord, *, url: str, step: int, key: str) -> str:
    """Refuse an array whose ``zarr.json`` (at ``key``) is not exactly the document the manifest implies.

    The whole document counts, types included (``0`` is not ``0.0``, ``false`` is not ``0``): plain
    zarr reads every field, so a renamed ``fill_value`` or a relabelled dtype attribute is as bad
    as a wrong shape. The chunk key separator is the one field the document chooses (`SEPARATORS`).

    Returns:
        The separator of the array's chunk keys, as its ``zarr.json`` declares it.
    """
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ManifestMismatchError(f"array metadata is not JSON: {exc}", url=url, step=step, key=key) from None
    separator = declared_separator(meta, url=url, step=step, key=key)
    expected = array_metadata(record, from_name(record.dtype), separator)
    try:
        problem = None if _canonical(meta) == _canonical(expected) else _difference(meta, expected)
    except (ValueError, RecursionError) as exc:
        raise ManifestMismatchError(f"array metadata is not JSON: {exc}", url=url, step=step, key=key) from None
    if problem is not None:
        raise ManifestMismatchError(problem, url=url, step=step, key=key)
    return separator


def declared_separator(meta: Any, *, url: str, step: int, key: str) -> str:
    """The chunk key separator a parsed ``zarr.json`` declares: zarr v3's ``default`` encoding with
    one of its two separators, `SEPARATORS`; any other encoding is refused, never guessed at."""
    encoding = meta.get("chunk_key_encoding") if isinstance(meta, dict) else None
    if encoding is None:
        return CHUNK_SEPARATOR  # the document is wrong anyway; the comparison says where
    config = encoding.get("configuration") if isinstance(encoding, dict) else None
    separator = config.get("separator") if isinstance(config, dict) else None
    if not isinstance(encoding, dict) or encoding.get("name") != "default" or separator not in SEPARATORS:
        raise ManifestMismatchError(
            f"chunk_key_encoding {_short(encoding)} is not one this format reads: zarr v3's "
            'default encoding with the separator "/" or "."',
            url=url,
            step=step,
            key=key,
        )
    return str(separator)


def _canonical(document: Any) -> str:
    return json.dumps(document, sort_keys=True, separators=(",", ":"))


def _difference(meta: Any, expected: dict[str, Any]) -> str:
    """What differs between a stored ``zarr.json`` and the expected one, field by field."""
    if not isinstance(meta, dict):
        return f"array metadata is a JSON {type(meta).__name__}, not an object"
    problems = [
        f"array {field} is {_short(meta[field])} on storage but the manifest implies {_short(expected[field])}"
        for field in expected
        if field in meta and _canonical(meta[field]) != _canonical(expected[field])
    ]
    problems += [
        f"array {field} is missing (the manifest implies {_short(expected[field])})"
        for field in expected
        if field not in meta
    ]
    problems += [f"unexpected field {_short(field)} in the array metadata" for field in meta if field not in expected]
    return "; ".join(problems)


def _short(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A flat byte view of a contiguous CPU tensor's memory (no copy)."""
    assert t.device.type == "cpu" and t.is_contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    flat = t.reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    array: Any = flat.numpy()
    return memoryview(array).cast("B")


def chunk_crc(data: memoryview, pad: memoryview | bytes | bytearray = b"") -> int:
    """The crc32c of an encoded chunk: its data followed by its edge padding."""
    crc = _crc32c.crc32c(data)
    return int(_crc32c.crc32c(pad, crc)) if len(pad) else int(crc)


def verify_chunk(
    data: memoryview,
    pad: memoryview | bytes | bytearray,
    stored_crc: bytes,
    expected: int | None,
    *,
    url: str,
    step: int,
    key: str,
) -> int:
    """Check a chunk's appended crc32c (and the one recorded in the rank index)."""
    actual = chunk_crc(data, pad)
    (appended,) = CRC.unpack(stored_crc)
    if actual != appended:
        raise ChecksumError(
            f"chunk data does not match its crc32c (stored {appended:08x}, computed {actual:08x})",
            url=url,
            step=step,
            key=key,
        )
    if expected is not None and appended != expected:
        raise ChecksumError(
            f"chunk crc32c {appended:08x} differs from the rank index ({expected:08x}): the chunk was replaced",
            url=url,
            step=step,
            key=key,
        )
    return actual
