"""Who holds which rows of each array, who writes which chunks, and what a rank must read back.

Every stored tensor is one *global* zarr array, chunked along its first dimension. A rank holds a
`Piece` of it: a block of whole rows (the full tensor for replicated state under DDP or a plain
module; its shard for FSDP2 / DTensor ``Shard(0)``). From every rank's pieces, each rank computes
the same `WritePlan`: chunk boundaries on shard boundaries, and each chunk written once, by one of
the ranks holding it, with bytes balanced across ranks. Restoring reads, per rank, only the chunks
that overlap the rows its live tensors need, so another world size or sharding is just another
read pattern.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard

import torch

from moai_ckpt import arrays as za
from moai_ckpt.dtypes import from_name
from moai_ckpt.format import ArrayRecord
from moai_ckpt.tree import tensor_refs
from moai_ckpt.wrappers import stored_to_live

try:  # DTensor is optional at import time (torch builds without distributed)
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
except ImportError:  # pragma: no cover
    DTensor = None  # type: ignore[assignment,misc]


@dataclass(frozen=True)
class Piece:
    """The rows ``[start, stop)`` of a global array that one rank holds (0-d: rows 0..1)."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    stop: int

    def to_json(self) -> list[Any]:
        return [self.dtype, list(self.shape), self.start, self.stop]

    @classmethod
    def from_json(cls, raw: list[Any]) -> Piece:
        dtype, shape, start, stop = raw
        return cls(dtype, tuple(shape), int(start), int(stop))

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1


def is_dtensor(t: torch.Tensor | None) -> TypeGuard[DTensor]:
    return DTensor is not None and isinstance(t, DTensor)


def local_piece(t: torch.Tensor) -> tuple[tuple[int, ...], int, int, torch.Tensor]:
    """(global shape, first row, last row + 1, local rows as a plain tensor) of a tensor.

    A DTensor sharded only along dimension 0 (FSDP2, HSDP) gives its own rows; any other
    placement is gathered to the full tensor (a collective: every rank must call this for the
    same tensors in the same order).
    """
    if not is_dtensor(t):
        shape = tuple(t.shape)
        return shape, 0, (shape[0] if shape else 1), t
    shape = tuple(t.shape)
    if shape and all(
        isinstance(p, (Shard, Replicate)) and (not isinstance(p, Shard) or p.dim == 0) for p in t.placements
    ):
        local_shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        return shape, offset[0], offset[0] + local_shape[0], t.to_local()
    full = t.full_tensor()
    return shape, 0, (shape[0] if shape else 1), full


def _divisor_at_most(n: int, limit: int) -> int:
    """The largest divisor of ``n`` that is at most ``limit`` (at least 1)."""
    if n <= limit:
        return n
    best = 1
    for d in range(1, math.isqrt(n) + 1):
        if n % d == 0:
            for candidate in (d, n // d):
                if candidate <= limit:
                    best = max(best, candidate)
    return best


def chunk_rows(shape: tuple[int, ...], itemsize: int, pieces: list[Piece], chunk_bytes: int) -> tuple[int, ...]:
    """The chunk shape of a global array: boundaries on every piece boundary, about ``chunk_bytes``."""
    if not shape:
        return ()
    rows = shape[0]
    cuts = {p.start for p in pieces} | {p.stop for p in pieces}
    cuts -= {0, rows}
    if not cuts:
        return za.choose_chunks(shape, itemsize, chunk_bytes)
    step = math.gcd(*cuts)
    row_bytes = max(1, math.prod(shape[1:]) * itemsize)
    return (_divisor_at_most(step, max(1, chunk_bytes // row_bytes)), *(max(1, d) for d in shape[1:]))


@dataclass(frozen=True)
class Assignment:
    """One chunk to write: which rank writes it and from which of its rows."""

    name: str
    span: za.ChunkSpan
    rank: int


@dataclass
class WritePlan:
    """The same on every rank: array records (global) and who writes each chunk."""

    records: dict[str, ArrayRecord]
    assignments: list[Assignment]

    def for_rank(self, rank: int) -> list[Assignment]:
        return [a for a in self.assignments if a.rank == rank]

    def jobs(
        self,
        rank: int,
        host: Mapping[str, torch.Tensor],
        pieces: Mapping[str, Piece],
        rank_local: Mapping[str, Mapping[int, str]],
    ) -> list[tuple[str, za.ChunkSpan, memoryview]]:
        """``rank``'s chunks to write: (array, span, bytes), cut from its host copies of its rows.

        ``host`` and ``pieces`` are by tensor; a rank-local copy (``rank_local``: tensor -> rank
        -> array of that rank's copy) is cut from this rank's own tensor.
        """
        tensor_of = {copies[rank]: name for name, copies in rank_local.items() if rank in copies}
        out = []
        for a in self.for_rank(rank):
            record = self.records[a.name]
            itemsize = from_name(record.dtype).itemsize
            row_bytes = math.prod(record.shape[1:]) * itemsize if record.shape else itemsize
            name = tensor_of.get(a.name, a.name)
            out.append((a.name, a.span, local_bytes(host[name], pieces[name], a.span, row_bytes)))
        return out


def plan_writes(pieces_by_rank: list[dict[str, Piece]], chunk_bytes: int, devices: dict[str, str]) -> WritePlan:
    """Decide chunking and writers from every rank's pieces (deterministic: all ranks agree)."""
    names = sorted({name for pieces in pieces_by_rank for name in pieces})
    records: dict[str, ArrayRecord] = {}
    candidates: list[tuple[int, str, za.ChunkSpan, list[int]]] = []
    for name in names:
        holders = [(rank, pieces[name]) for rank, pieces in enumerate(pieces_by_rank) if name in pieces]
        first = holders[0][1]
        stored = from_name(first.dtype)
        chunks = chunk_rows(first.shape, stored.itemsize, [p for _, p in holders], chunk_bytes)
        records[name] = ArrayRecord(
            path=name, dtype=first.dtype, shape=first.shape, chunks=chunks, device=devices.get(name, "cpu")
        )
        row_bytes = math.prod(first.shape[1:]) * stored.itemsize if first.shape else stored.itemsize
        for span in za.chunk_spans(first.shape, chunks, stored.itemsize):
            lo, hi = (span.start // row_bytes, span.stop // row_bytes) if first.shape else (0, 1)
            owners = [rank for rank, p in holders if p.start <= lo and hi <= p.stop]
            if not owners:
                raise ValueError(f"no rank holds rows {lo}..{hi} of {name}")
            candidates.append((span.stop - span.start, name, span, owners))
    load = [0] * len(pieces_by_rank)
    assignments = []
    # largest first onto the least loaded holder: balanced writes for replicated state
    for size, name, span, owners in sorted(candidates, key=lambda c: (-c[0], c[1], c[2].index)):
        rank = min(owners, key=lambda r: (load[r], r))
        load[rank] += size
        assignments.append(Assignment(name, span, rank))
    return WritePlan(records, assignments)


def local_bytes(local: torch.Tensor, piece: Piece, span: za.ChunkSpan, row_bytes: int) -> memoryview:
    """The bytes of a chunk, cut from the rank's host copy of its rows."""
    data = za.tensor_bytes(local)
    offset = piece.start * row_bytes
    return data[span.start - offset : span.stop - offset]


@dataclass(frozen=True)
class Target:
    """What a rank needs of one array: rows ``[start, stop)``, and how to present them."""

    start: int
    stop: int
    like: torch.Tensor | None = None  # a live DTensor to mirror (mesh, placements), if any

    def wrap(self, rows: torch.Tensor, shape: tuple[int, ...], device: torch.device | None) -> torch.Tensor:
        """Turn the rows read into what the live object holds (a plain tensor or a DTensor)."""
        if device is not None and rows.device != device:
            rows = rows.to(device)
        if self.like is None or not is_dtensor(self.like):
            return rows
        like = self.like
        if shape:
            local_shape, offset = compute_local_shape_and_global_offset(like.shape, like.device_mesh, like.placements)
            for dim in range(1, len(shape)):  # other dims sharded (tensor parallel): cut them too
                if local_shape[dim] != shape[dim]:
                    rows = rows.narrow(dim, offset[dim], local_shape[dim])
        return DTensor.from_local(
            rows.contiguous(),
            like.device_mesh,
            like.placements,
            run_check=False,
            shape=like.shape,
            stride=like.stride(),
        )


def target_for(live: torch.Tensor | None, shape: tuple[int, ...]) -> Target:
    """The rows a live tensor needs (all of them, unless it is a DTensor sharded along dim 0)."""
    full = Target(0, shape[0] if shape else 1, live)
    if live is None or not is_dtensor(live) or not shape or tuple(live.shape) != shape:
        return full
    local_shape, offset = compute_local_shape_and_global_offset(live.shape, live.device_mesh, live.placements)
    return Target(offset[0], offset[0] + local_shape[0], live)


def _ref(node: Any) -> str | None:
    return node.get("$tensor") if isinstance(node, dict) and isinstance(node.get("$tensor"), str) else None


def live_targets(records: dict[str, Any], wanted: dict[str, Any], arrays: dict[str, ArrayRecord]) -> dict[str, Target]:
    """For each array a restore reads, the rows the live objects need and what to mirror.

    Module tensors mirror the live parameter or buffer of the same canonical name; optimizer state tensors
    mirror their parameter (matched by position, as ``load_state_dict`` does); a partial object's
    tensors mirror what its ``like(entry)`` returns, when the shapes agree. Everything else is
    read whole.
    """
    out: dict[str, Target] = {}

    def mirror(ref: str | None, live: torch.Tensor | None) -> None:
        if ref is not None and ref in arrays:
            out[ref] = target_for(live, arrays[ref].shape)

    for key, obj in wanted.items():
        record = records.get(key)
        if record is None:
            continue
        tree = record.tree
        if record.kind == "partial" and callable(getattr(obj, "like", None)) and isinstance(tree, dict):
            for entry, node in tree.items():
                live = obj.like(entry)
                for name in sorted(tensor_refs(node)):
                    if name in arrays and live is not None and arrays[name].shape == tuple(live.shape):
                        mirror(name, live)
        elif record.kind == "module" and isinstance(obj, torch.nn.Module) and isinstance(tree, dict):
            live = obj.state_dict()
            to_live = stored_to_live(obj, tree)  # canonical (or older, wrapped) names -> live keys
            for name, node in tree.items():
                mirror(_ref(node), live.get(to_live[name]))
        elif record.kind == "optimizer" and isinstance(obj, torch.optim.Optimizer) and isinstance(tree, dict):
            params = [p for group in obj.param_groups for p in group["params"]]
            by_id = dict(zip(_saved_ids(tree), params, strict=False))
            for pid, pstate in _state_pairs(tree):
                param = by_id.get(pid)
                for node in pstate.values():
                    ref = _ref(node)
                    if (
                        ref is not None
                        and ref in arrays
                        and param is not None
                        and arrays[ref].shape == tuple(param.shape)
                    ):
                        mirror(ref, param)
    return out


# the stored tree is untrusted: anything but the shape `encode` writes is skipped here, and
# `capture.Restorer.check` refuses it with an error naming it


def _saved_ids(tree: dict[str, Any]) -> list[int]:
    """The parameter ids of an encoded optimizer state dict, group by group."""
    groups = tree.get("param_groups")
    ids: list[int] = []
    for group in groups if isinstance(groups, list) else []:
        params = group.get("params") if isinstance(group, dict) else None
        ids += [pid for pid in params if type(pid) is int] if isinstance(params, list) else []
    return ids


def _state_pairs(tree: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    """(parameter id, encoded state) pairs of an encoded optimizer state dict."""
    state = tree.get("state")
    pairs = state.get("$dict") if isinstance(state, dict) else None
    return [
        (pair[0], pair[1])
        for pair in (pairs if isinstance(pairs, list) else [])
        if isinstance(pair, list) and len(pair) == 2 and type(pair[0]) is int and isinstance(pair[1], dict)
    ]
