"""Exact digests of tensors, computed where the tensors live, without a host copy of their data.

Two digests are exact in the sense that matters for checking a replay: any change of any bit
changes them (collisions of *different* states are possible, as for every hash, but a single
flipped bit, a changed word or a value moved between blocks always shows).

- **CPU tensors**: the crc32c of the tensor's bytes (hardware-accelerated; the C call releases
  the GIL). Computed at once, on the calling thread.
- **Device tensors (CUDA and others)**: two 64-bit sums of the tensor's words, on the device: the
  plain sum (a flipped bit ``b`` moves it by ``±2**b``, never by a multiple of ``2**64``) and a
  sum of 4096-word blocks weighted by odd block numbers (values moved between blocks). The work is
  queued on the current stream; the host reads the few result words later, through one
  non-blocking copy per device and an event (`PendingDigests.wait`), so the caller never waits.

A digest is a short string, ``"crc32c:<hex>"`` or ``"sum64:<hex>:<hex>"``: digests of the same
bytes taken on different device types differ, which is why replays compare them only on the
placement and device type that wrote them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import crc32c as _crc32c
import torch

BLOCK_WORDS = 4096

__all__ = ["BLOCK_WORDS", "PendingDigests", "digest_tensors", "host_digest", "local_tensor"]


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The tensor whose bytes this rank holds: a DTensor's local shard, the tensor itself otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t


def _flat_bytes(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    if not t.is_contiguous():
        t = t.contiguous()
    return t.reshape(-1).view(torch.uint8)


def host_digest(t: torch.Tensor) -> str:
    """The crc32c digest of a CPU tensor's bytes (with its byte length)."""
    data = _flat_bytes(t)
    crc = _crc32c.crc32c(data.numpy().data) if data.numel() else 0
    return f"crc32c:{data.numel():x}:{int(crc):08x}"


def _words(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as 1-D integer words of the widest type its size allows."""
    data = _flat_bytes(t)
    n = data.numel()
    if n % 4 == 0:
        return data.view(torch.int32)
    if n % 2 == 0:
        return data.view(torch.int16)
    return data


def _device_sums(t: torch.Tensor) -> torch.Tensor:
    """int64 [2]: plain sum of words, block-weighted sum of words (on t's device, no host copy).

    The byte length is known on the host (`_nbytes`); nothing here copies from the host, which
    would wait for the device.
    """
    words = _words(t)
    n = words.numel()
    if n == 0:
        return torch.zeros(2, dtype=torch.int64, device=words.device)
    plain = words.sum(dtype=torch.int64)
    rows = n // BLOCK_WORDS
    weighted = torch.zeros((), dtype=torch.int64, device=words.device)
    if rows:
        blocks = words[: rows * BLOCK_WORDS].view(rows, BLOCK_WORDS).sum(1, dtype=torch.int64)
        weights = torch.arange(1, 2 * rows, 2, dtype=torch.int64, device=words.device)
        weighted = (blocks * weights).sum()
    if rows * BLOCK_WORDS < n:
        weighted = weighted + words[rows * BLOCK_WORDS :].sum(dtype=torch.int64) * (2 * rows + 1)
    return torch.stack([plain, weighted])


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass
class PendingDigests:
    """Digests on their way to the host: CPU ones are ready, device ones land after an event."""

    names: list[str]
    ready: dict[str, str] = field(default_factory=dict)
    _device: list[tuple[list[tuple[str, int]], torch.Tensor, Any]] = field(default_factory=list)

    def wait(self) -> dict[str, str]:
        """Every digest by name (waits only for the device copies still in flight)."""
        out = dict(self.ready)
        for named, values, event in self._device:
            if event is not None:
                event.synchronize()
            for (name, nbytes), (plain, weighted) in zip(named, values.tolist(), strict=True):
                out[name] = f"sum64:{nbytes:x}:{plain & (2**64 - 1):016x}:{weighted & (2**64 - 1):016x}"
        return {name: out[name] for name in self.names}


def digest_tensors(named: Sequence[tuple[str, torch.Tensor]]) -> PendingDigests:
    """Start the digests of ``named`` tensors (a DTensor digests its local shard).

    CPU tensors are hashed now; device tensors are reduced on their device (queued on the
    current stream, so they see every write queued before) and copied back without a wait.
    Meta tensors have no bytes: their digest says so.
    """
    pending = PendingDigests([name for name, _ in named])
    by_device: dict[torch.device, tuple[list[tuple[str, int]], list[torch.Tensor]]] = {}
    for name, tensor in named:
        local = local_tensor(tensor)
        if local.device.type == "meta":
            pending.ready[name] = "meta"
        elif local.device.type == "cpu":
            pending.ready[name] = host_digest(local)
        else:
            named_sums = by_device.setdefault(local.device, ([], []))
            named_sums[0].append((name, _nbytes(local)))
            named_sums[1].append(_device_sums(local))
    for device, (names, sums) in by_device.items():
        stacked = torch.stack(sums)
        if device.type == "cuda":  # lands in pinned memory; the event says when
            host = stacked.to("cpu", non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:  # other accelerators: a plain (waiting) copy of a few words
            host, event = stacked.cpu(), None
        pending._device.append((names, host, event))
    return pending
