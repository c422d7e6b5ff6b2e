"""Tensors as zarr v3 arrays: metadata, chunk layout, encoding and checked decoding.

The encoding is exactly zarr v3's ``bytes`` codec (little-endian, C order) followed by its
``crc32c`` codec, so plain zarr reads every array. moai-ckpt writes and reads the chunk objects
itself, straight from and into tensor memory: no intermediate buffers, no event loop, vectored
I/O, and each chunk's crc32c computed once and recorded in the rank index as well as appended.

Tensors are chunked along their first dimension only, ``chunk_bytes`` at most per chunk (at least
one row). Sharded tensors (a later layer) use the same grid with boundaries on shard boundaries.
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
from moai_ckpt.errors import ChecksumError, ManifestMismatchError
from moai_ckpt.format import ArrayRecord

DEFAULT_CHUNK_BYTES = 64 << 20
CRC = struct.Struct("<I")
MOAI_ATTR = "moai_ckpt"


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

    @property
    def key(self) -> str:
        return "c" if not self.index else "c/" + "/".join(str(i) for i in self.index)


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


def array_metadata(record: ArrayRecord, stored: StoredDtype) -> dict[str, Any]:
    """The zarr v3 ``zarr.json`` document for a stored tensor."""
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
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": fill,
        "codecs": [bytes_codec, {"name": "crc32c"}],
        "attributes": attributes,
        "storage_transformers": [],
    }


def group_metadata(attributes: dict[str, Any] | None = None) -> bytes:
    return json.dumps({"zarr_format": 3, "node_type": "group", "attributes": attributes or {}}, indent=1).encode()


def check_array_metadata(raw: bytes, record: ArrayRecord, *, url: str, step: int, key: str) -> None:
    """Refuse an array whose ``zarr.json`` (at ``key``) disagrees with the manifest."""
    try:
        meta = json.loads(raw)
    except ValueError as exc:
        raise ManifestMismatchError(f"array metadata is not JSON: {exc}", url=url, step=step, key=key) from None
    expected = array_metadata(record, from_name(record.dtype))
    for field in ("node_type", "shape", "data_type", "chunk_grid", "chunk_key_encoding", "codecs"):
        if meta.get(field) != expected[field]:
            raise ManifestMismatchError(
                f"array {field} is {meta.get(field)!r} on storage but the manifest implies {expected[field]!r}",
                url=url,
                step=step,
                key=key,
            )


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
