"""Batches as bytes, without pickle: for data sources the log cannot name by sample index.

`pack` turns a tensor, or a dict / list / tuple of tensors and JSON-able values, into
``u32 header length | JSON header | raw tensor bytes``; `unpack` reverses it. A *global* batch is
every rank's part concatenated along dimension 0 (`join`), so it replays on any world size
(`part_of` takes a rank's rows back out: the recorded split on the same world size, an even split
otherwise).
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import torch

from moai_ckpt.errors import CorruptSnapshotError, UnserializableStateError
from moai_ckpt.tree import TensorSink, decode, encode

_LEN = struct.Struct("<I")


def pack(batch: Any, parts: list[int] | None = None) -> bytes:
    """Serialize ``batch``; ``parts`` records how many rows each rank contributed."""
    sink = TensorSink(lambda path: f"t{len(sink.tensors)}")
    tree = encode(batch, "batch", sink)
    metas, blobs, offset = {}, [], 0
    for name, tensor in sink.tensors.items():
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        metas[name] = [str(tensor.dtype).removeprefix("torch."), list(tensor.shape), offset, len(data)]
        blobs.append(data)
        offset += len(data)
    header = json.dumps({"tree": tree, "tensors": metas, "parts": parts}, sort_keys=True).encode()
    return b"".join([_LEN.pack(len(header)), header, *blobs])


def unpack(data: bytes, device: torch.device | str = "cpu") -> tuple[Any, list[int] | None]:
    """(the batch, the rows per rank it was joined from).

    The bytes come from storage: anything `pack` does not write is a `CorruptSnapshotError`.
    """
    try:
        (length,) = _LEN.unpack_from(data, 0)
        header = json.loads(data[_LEN.size : _LEN.size + length])
        body = memoryview(data)[_LEN.size + length :]
        tensors = {name: _tensor(meta, body).to(device) for name, meta in header["tensors"].items()}
        parts = header["parts"]
        tree = header["tree"]
    except (struct.error, ValueError, RecursionError, KeyError, TypeError, AttributeError, RuntimeError) as exc:
        raise CorruptSnapshotError(f"logged batch does not parse ({type(exc).__name__}: {exc})") from None
    if parts is not None and not (isinstance(parts, list) and all(type(p) is int and p >= 0 for p in parts)):
        raise CorruptSnapshotError("logged batch has a malformed row split")
    return decode(tree, tensors, "batch"), parts


def _tensor(meta: Any, body: memoryview) -> torch.Tensor:
    """One tensor of a packed batch, checked against the bytes there are before anything is allocated."""
    dtype_name, shape, offset, nbytes = meta
    dtype = getattr(torch, dtype_name) if isinstance(dtype_name, str) else None
    dims_ok = isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)
    if not isinstance(dtype, torch.dtype) or not dims_ok or type(offset) is not int or type(nbytes) is not int:
        raise ValueError(f"malformed tensor entry {meta!r:.200}")
    if nbytes != math.prod(shape) * dtype.itemsize or not 0 <= offset <= offset + nbytes <= len(body):
        raise ValueError(f"tensor entry of {nbytes} bytes at {offset} does not fit its shape or the batch")
    if not nbytes:
        return torch.empty(shape, dtype=dtype)
    raw = torch.frombuffer(bytearray(body[offset : offset + nbytes]), dtype=torch.uint8)
    return raw.view(dtype).reshape(shape)


def _rows(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    if isinstance(batch, dict):
        for v in batch.values():
            if isinstance(v, torch.Tensor):
                return _rows(v)
    if isinstance(batch, list | tuple):
        for v in batch:
            if isinstance(v, torch.Tensor):
                return _rows(v)
    raise UnserializableStateError(f"a logged batch needs a tensor to count its rows, got {type(batch).__name__}")


def join(parts: list[Any]) -> tuple[Any, list[int]]:
    """Concatenate every rank's batch along dimension 0: (global batch, rows per rank)."""
    rows = [_rows(p) for p in parts]
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat([p.reshape(p.shape if p.dim() else (1,)) for p in parts]), rows
    if isinstance(first, dict):
        joined = {k: join([p[k] for p in parts])[0] if isinstance(v, torch.Tensor) else v for k, v in first.items()}
        return joined, rows
    if isinstance(first, list | tuple):
        items = [join([p[i] for p in parts])[0] if isinstance(v, torch.Tensor) else v for i, v in enumerate(first)]
        return type(first)(items), rows
    raise UnserializableStateError(f"cannot join batches of type {type(first).__name__}")


def part_of(batch: Any, parts: list[int] | None, rank: int, world_size: int) -> Any:
    """This rank's rows of a global batch."""
    total = _rows(batch)
    if parts is not None and len(parts) == world_size:
        start = sum(parts[:rank])
        stop = start + parts[rank]
    else:
        base, extra = divmod(total, world_size)
        start = rank * base + min(rank, extra)
        stop = start + base + (1 if rank < extra else 0)
    return _slice(batch, start, stop)


def _slice(batch: Any, start: int, stop: int) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[start:stop]
    if isinstance(batch, dict):
        return {k: _slice(v, start, stop) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(_slice(v, start, stop) if isinstance(v, torch.Tensor) else v for v in batch)
    return batch
