"""Digests of a fixed list of tensors, prepared once so that each step costs a few calls.

`moai_ckpt.digest.digest_tensors` works out, on every call and for every tensor, where it lives,
which words it has and which kernel reduces it: tens of microseconds of Python per tensor. A
job's parameters and optimizer state are the same tensors at the same addresses from step to
step, so `DigestPlan` does that work once, and `DigestPlan.start` then costs a few calls however
many tensors there are:

- **CPU tensors**: a buffer over each one's bytes is kept (its address and size, checked by
  `holds` before every start); `start` takes the crc32c of each (the C call releases the GIL)
  before the next step can change them.
- **CUDA tensors whose bytes make whole 32-bit words** (nearly all): one launch of the fused
  kernel (`moai_ckpt.digest_cuda`) over a block table built once, per device.
- **the rest** (odd byte counts, views that are not contiguous, other accelerators, no Triton):
  `moai_ckpt.digest.device_sums` on every start, as `digest_tensors` does.

Device work is queued on the current stream (callers choose a side stream), with a non-blocking
copy of the results into pinned memory and an event; `PlannedDigests.wait`, on another thread,
waits for the event and formats the digests: the very strings `digest_tensors` gives (the tests
compare them). `DigestPlan.holds` says whether every tensor is still where the plan found it.
"""

from __future__ import annotations

import operator
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import crc32c as _crc32c
import torch

from moai_ckpt import digest_cuda
from moai_ckpt.digest import (
    address_buffer,
    crc_digest,
    device_sums,
    flat_bytes,
    host_digest,
    local_tensor,
    mix_digest,
    reference_sums,
    word_view,
)

__all__ = ["DigestPlan", "PlannedDigests", "packed_digest"]

_U32, _U64x2 = struct.Struct("<I"), struct.Struct("<QQ")
_ADDRESS = torch.Tensor.data_ptr
_NBYTES = operator.attrgetter("nbytes")


def _head(tag: int, nbytes: int) -> bytes:
    """A packed entry's tag byte and byte length (unsigned LEB128: 7 bits a byte, low bits first)."""
    out = bytearray([tag])
    while nbytes >= 0x80:
        out.append(nbytes & 0x7F | 0x80)
        nbytes >>= 7
    out.append(nbytes)
    return bytes(out)


def packed_digest(nbytes: int | None, *fields: int) -> bytes:
    """One digest in the log's packed layout (`replay.statedigest.pack`).

    ``None``: no bytes (a meta tensor), tag 0; a crc32c: tag 1, the byte length, the crc (u32 LE);
    two sums: tag 2, the byte length, each sum modulo 2**64 (u64 LE).
    """
    if nbytes is None:
        return b"\x00"
    if len(fields) == 1:
        return _head(1, nbytes) + _U32.pack(fields[0])
    plain, weighted = fields
    return _head(2, nbytes) + _U64x2.pack(plain & (2**64 - 1), weighted & (2**64 - 1))


@dataclass
class _DeviceGroup:
    """The tensors of one device: those the fused kernel reduces (with its table) and the rest."""

    device: torch.device
    fused: list[int] = field(default_factory=list)  # positions in the plan
    words: list[torch.Tensor] = field(default_factory=list)  # their int32 views
    table: torch.Tensor | None = None
    pinned: torch.Tensor | None = None  # the table's host copy, kept while the table lives
    blocks: int = 0
    rest: list[int] = field(default_factory=list)


class DigestPlan:
    """The digests of ``tensors`` (a DTensor's local shard), prepared for repeated starts.

    The plan holds the tensors (so their memory stays theirs); on CUDA it marks them as used by
    the stream current when it is built, so that memory freed after a rebuild is not reused
    before the work queued there has read it.
    """

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        self.tensors = [local_tensor(t) for t in tensors]
        self.addresses = list(map(_ADDRESS, self.tensors))
        self.sizes = list(map(_NBYTES, self.tensors))
        self.heads: list[bytes] = []  # each tensor's packed tag and length (`packed_digest`)
        self.meta: list[int] = []
        self.host: list[int] = []  # CPU tensors read through a kept buffer
        self.buffers: list[Any] = []
        self.host_copied: list[int] = []  # CPU tensors that need a copy to be read (not contiguous)
        self.groups: dict[torch.device, _DeviceGroup] = {}
        for i, t in enumerate(self.tensors):
            self.heads.append(_head(1 if t.device.type == "cpu" else 2, self.sizes[i]))
            if t.device.type == "meta":
                self.meta.append(i)
            elif t.device.type == "cpu":
                self._add_host(i, t)
            else:
                self._add_device(i, t)
        for group in self.groups.values():
            if group.words:
                layout = tuple((w.data_ptr(), w.numel()) for w in group.words)
                group.table, group.pinned, group.blocks = digest_cuda.block_table(layout, group.device)

    def _add_host(self, i: int, t: torch.Tensor) -> None:
        data = flat_bytes(t)
        if data.numel() and data.data_ptr() == t.data_ptr():  # a view: read the tensor's own bytes
            self.host.append(i)
            self.buffers.append(address_buffer(data))
        elif data.numel():
            self.host_copied.append(i)
        else:
            self.host.append(i)
            self.buffers.append(b"")

    def _add_device(self, i: int, t: torch.Tensor) -> None:
        group = self.groups.setdefault(t.device, _DeviceGroup(t.device))
        words = word_view(t) if t.is_contiguous() and not (t.dtype.is_complex or t.is_neg()) else None
        if t.device.type == "cuda":
            t.detach().record_stream(torch.cuda.current_stream(t.device))
            if words is not None and words.dtype == torch.int32 and digest_cuda.available():
                group.fused.append(i)
                group.words.append(words)
                return
        group.rest.append(i)

    def holds(self) -> bool:
        """Whether every tensor is still at the address and of the size the plan found (C-speed passes)."""
        return list(map(_ADDRESS, self.tensors)) == self.addresses and list(map(_NBYTES, self.tensors)) == self.sizes

    def start(self) -> PlannedDigests:
        """Hash the CPU tensors now; queue the device reductions and their copy to the host."""
        crcs = [_crc32c.crc32c(b) for b in self.buffers]
        copied = [host_digest(self.tensors[i]) for i in self.host_copied]
        pending = PlannedDigests(self, crcs, copied)
        for group in self.groups.values():
            parts = []
            if group.fused:
                parts.append((group.fused, self._fused_sums(group)))
            if group.rest:
                parts.append((group.rest, device_sums([self.tensors[i] for i in group.rest])))
            for index, sums in parts:
                if group.device.type == "cuda":  # lands in pinned memory; the event says when
                    pending.rows.append((index, sums.to("cpu", non_blocking=True)))
                else:  # other accelerators: a plain (waiting) copy of a few words
                    pending.rows.append((index, sums.cpu()))
            if group.device.type == "cuda":
                pending.events.append(torch.cuda.current_stream(group.device).record_event())
        return pending

    def _fused_sums(self, group: _DeviceGroup) -> torch.Tensor:
        if group.table is not None and digest_cuda.available():
            out = torch.zeros(len(group.fused), 2, dtype=torch.int64, device=group.device)
            try:
                digest_cuda.launch(group.table, group.blocks, out)
                return out
            except Exception as exc:  # noqa: BLE001 - a kernel that cannot compile here must not stop training
                digest_cuda.disable(f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
        return reference_sums(group.words)


@dataclass
class PlannedDigests:
    """A plan's digests on their way to the host; `wait` (any thread) returns them in the plan's order."""

    plan: DigestPlan
    crcs: list[int]
    copied: list[str]
    rows: list[tuple[list[int], torch.Tensor]] = field(default_factory=list)
    events: list[Any] = field(default_factory=list)

    def wait(self) -> list[str]:
        """Every tensor's digest (waits for the device results only)."""
        for event in self.events:
            event.synchronize()
        plan = self.plan
        out = [""] * len(plan.tensors)
        for i in plan.meta:
            out[i] = "meta"
        for i, crc in zip(plan.host, self.crcs, strict=True):
            out[i] = crc_digest(plan.sizes[i], crc)
        for i, digest in zip(plan.host_copied, self.copied, strict=True):
            out[i] = digest
        for index, sums in self.rows:
            for i, (plain, weighted) in zip(index, sums.tolist(), strict=True):
                out[i] = mix_digest(plan.sizes[i], plain, weighted)
        return out

    def packed(self) -> list[bytes]:
        """Every tensor's digest in the log's packed layout (`packed_digest`), without strings."""
        for event in self.events:
            event.synchronize()
        plan = self.plan
        out = [b""] * len(plan.tensors)
        for i in plan.meta:
            out[i] = packed_digest(None)
        for i, crc in zip(plan.host, self.crcs, strict=True):
            out[i] = plan.heads[i] + _U32.pack(crc)
        for i, digest in zip(plan.host_copied, self.copied, strict=True):
            _, size, value = digest.split(":")
            out[i] = packed_digest(int(size, 16), int(value, 16))
        for index, sums in self.rows:
            words = sums.numpy().astype("<i8", copy=False).tobytes()  # little-endian: the u64 fields mod 2**64
            for row, i in enumerate(index):
                out[i] = plan.heads[i] + words[16 * row : 16 * row + 16]
        return out
