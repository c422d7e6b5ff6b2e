"""Exact digests of tensors, computed where the tensors live, without a host copy of their data.

Digests are exact in the sense that matters for checking a replay: any change of any bit changes
them (collisions of *different* states are possible, as for every hash, but a single flipped bit
or a changed word always shows, and values moved between positions show but for a 2**-64 chance).

- **CPU tensors**: the crc32c of the tensor's bytes (hardware-accelerated; the C call releases
  the GIL). Computed at once, on the calling thread.
- **Device tensors (CUDA and others)**: two 64-bit sums of the tensor's words, on the device: the
  plain sum (a flipped bit ``b`` moves it by ``±2**b``, never by a multiple of ``2**64``) and the
  sum of every 32-bit word mixed with its position (`mix`: a multiply-add, then the lowbias32
  integer hash; one fused kernel on CUDA, `moai_ckpt.digest_cuda`), so
  that equal values at other positions (two ranks that counted different samples the same number
  of times) give other sums. The work is queued on the current stream; the host reads the few
  result words later, through one non-blocking copy per device and an event
  (`PendingDigests.wait`), so the caller never waits.

A digest is a short string, ``"crc32c:<hex>"`` or ``"mix64:<hex>:<hex>:<hex>"``: digests of the same
bytes taken on different device types differ, which is why replays compare them only on the
placement and device type that wrote them.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import crc32c as _crc32c
import torch

SMALL_WORDS = 1 << 14  # tensors of at most this many words are reduced together

__all__ = [
    "PendingDigests",
    "address_buffer",
    "crc_digest",
    "device_sums",
    "digest_tensors",
    "flat_bytes",
    "host_digest",
    "local_tensor",
    "mix",
    "mix_digest",
    "reference_sums",
    "word_view",
]


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The tensor whose bytes this rank holds: a DTensor's local shard, the tensor itself otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t


def flat_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as read, 1-D uint8: a view when it is contiguous and plain, else a copy."""
    if t.requires_grad:
        t = t.detach()
    if t.dtype.is_complex or t.is_neg():  # lazy conjugate / negative views: the bits as read
        t = t.resolve_conj().resolve_neg()
    if not t.is_contiguous():
        t = t.contiguous()
    return t.reshape(-1).view(torch.uint8)


def host_digest(t: torch.Tensor) -> str:
    """The crc32c digest of a CPU tensor's bytes (with its byte length)."""
    data = flat_bytes(t)
    n = data.numel()
    return crc_digest(n, _crc32c.crc32c(address_buffer(data)) if n else 0)


def address_buffer(data: torch.Tensor) -> Any:
    """A buffer over a contiguous CPU tensor's bytes, by address (valid while the tensor is).

    Not ``numpy()``: a numpy view makes the tensor's storage unresizable for good.
    """
    return (ctypes.c_char * (data.numel() * data.element_size())).from_address(data.data_ptr())


def word_view(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as 1-D integer words of the widest type its size allows."""
    data = flat_bytes(t)
    n = data.numel()
    if n % 4 == 0:
        return data.view(torch.int32)
    if n % 2 == 0:
        return data.view(torch.int16)
    return data


_M32 = 0xFFFFFFFF
# 32-bit mixing constants: a golden-ratio word multiplier, a position multiplier, and the two
# multipliers of the "lowbias32" integer hash (one xor-shift-multiply round per constant)
_K_WORD, _K_POS, _K_MIX1, _K_MIX2 = 0x9E3779B1, 0x85EBCA77, 0x7FEB352D, 0x846CA68B


def mix(words: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Each 32-bit word mixed with its position, as non-negative int64 values below 2**32.

    ``words`` holds the words' bit patterns (any integer dtype; only the low 32 bits count) and
    ``positions`` their indices. The mix is 32-bit wrapping arithmetic with logical shifts,
    computed here in int64 with masks so that every device (and the fused CUDA kernel in
    `moai_ckpt.digest_cuda`) gives the same integers; the tests compare devices against this
    function run on the CPU.
    """
    x = ((words & _M32) * _K_WORD + (positions & _M32) * _K_POS) & _M32
    x = x ^ (x >> 16)
    x = (x * _K_MIX1) & _M32
    x = x ^ (x >> 15)
    x = (x * _K_MIX2) & _M32
    return x ^ (x >> 16)


def _large_sums(words: torch.Tensor) -> torch.Tensor:
    """int64 [2] of one large tensor: the plain sum of its words and the sum of their mixes."""
    wide = words.to(torch.int64)
    positions = torch.arange(wide.numel(), dtype=torch.int64, device=wide.device)
    return torch.stack([wide.sum(), mix(wide, positions).sum()])


@functools.lru_cache(maxsize=64)
def _layout(lengths: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """For tensors of ``lengths`` words laid end to end: each word's position in its own tensor,
    and each tensor's (start, end) in the running sums (which begin with a zero).

    Built on the host once per layout and copied without a wait (from pinned memory, kept with
    the cache entry so that the copy cannot outlive it).
    """
    sizes = torch.tensor(lengths, dtype=torch.int64)
    ends = torch.cumsum(sizes, 0)
    starts = ends - sizes
    index = torch.repeat_interleave(torch.arange(len(lengths)), sizes)
    position = torch.arange(index.numel()) - starts[index]
    host = torch.cat([position, starts, ends])
    if device.type == "cuda":
        host = host.pin_memory()
    on_device = host.to(device, non_blocking=True)
    n = position.numel()
    return on_device[:n], on_device[n:].view(2, len(lengths)), host


def _batched_sums(words: list[torch.Tensor]) -> torch.Tensor:
    """int64 [k, 2] for k small tensors of one word type: a handful of kernels for all of them.

    Running sums (integer, so exact and deterministic on every device) laid over all the
    tensors' words; each tensor's sums are the difference at its two ends.
    """
    flat = torch.cat(words).to(torch.int64)
    position, bounds, _ = _layout(tuple(w.numel() for w in words), flat.device)
    running = torch.nn.functional.pad(torch.stack([flat, mix(flat, position)]).cumsum(1), (1, 0))
    return (running[:, bounds[1]] - running[:, bounds[0]]).t()


def reference_sums(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """int64 [k, 2] on the tensors' device, computed with plain torch operations.

    What `device_sums` computes: the reference for the fused CUDA kernel, and the path for
    devices without one. Large tensors are reduced alone, small ones together (a few kernels
    for all of them); integer sums wrap modulo 2**64 in any order, so both give the same sums.
    """
    words = [word_view(t) for t in tensors]
    out: list[torch.Tensor | None] = [None] * len(words)
    small: dict[torch.dtype, list[int]] = {}
    for i, w in enumerate(words):
        if w.numel() > SMALL_WORDS:
            out[i] = _large_sums(w).reshape(1, 2)
        else:
            small.setdefault(w.dtype, []).append(i)
    for members in small.values():
        sums = _batched_sums([words[i] for i in members])
        for row, i in enumerate(members):
            out[i] = sums[row : row + 1]
    return torch.cat([t for t in out if t is not None]) if out else torch.zeros(0, 2, dtype=torch.int64)


def device_sums(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """int64 [k, 2] on the tensors' device: each tensor's plain word sum and the sum of its
    words mixed with their positions (`mix`).

    On CUDA, tensors whose bytes make whole 32-bit words go through one fused kernel
    (`moai_ckpt.digest_cuda`: one read of each word, two launches for all of them) when Triton
    is there; everything else through `reference_sums`. Nothing is copied from the host (that
    would wait for the device), except a layout seen for the first time, from pinned memory.
    """
    if not tensors or tensors[0].device.type != "cuda":
        return reference_sums(tensors)
    from moai_ckpt import digest_cuda

    fused = [i for i, t in enumerate(tensors) if digest_cuda.available() and _nbytes(t) % 4 == 0]
    if not fused:
        return reference_sums(tensors)
    chosen = set(fused)
    rest = [i for i in range(len(tensors)) if i not in chosen]
    rows: dict[int, torch.Tensor] = {}
    try:
        fused_sums = digest_cuda.word_sums([word_view(tensors[i]) for i in fused])
    except Exception as exc:  # noqa: BLE001 - a kernel that cannot compile here must not stop training
        digest_cuda.disable(f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
        return reference_sums(tensors)
    for results, members in (
        (fused_sums, fused),
        (reference_sums([tensors[i] for i in rest]) if rest else None, rest),
    ):
        for row, i in enumerate(members):
            assert results is not None
            rows[i] = results[row : row + 1]
    # slices in the callers' order (an index tensor built on the host would wait for the device)
    return rows[0] if len(rows) == 1 else torch.cat([rows[i] for i in range(len(tensors))])


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def mix_digest(nbytes: int, plain: int, weighted: int) -> str:
    """The digest string of a device tensor of ``nbytes`` bytes from its two sums (any sign)."""
    return f"mix64:{nbytes:x}:{plain & (2**64 - 1):016x}:{weighted & (2**64 - 1):016x}"


def crc_digest(nbytes: int, crc: int) -> str:
    """The digest string of a CPU tensor of ``nbytes`` bytes from the crc32c of its bytes."""
    return f"crc32c:{nbytes:x}:{crc:08x}"


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
                out[name] = mix_digest(nbytes, plain, weighted)
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
        device = local.device
        if device.type == "cpu":
            pending.ready[name] = host_digest(local)
        elif device.type == "meta":
            pending.ready[name] = "meta"
        else:
            names, tensors = by_device.setdefault(device, ([], []))
            names.append((name, _nbytes(local)))
            tensors.append(local)
    for device, (names, tensors) in by_device.items():
        stacked = device_sums(tensors)
        if device.type == "cuda":  # lands in pinned memory; the event says when
            host = stacked.to("cpu", non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:  # other accelerators: a plain (waiting) copy of a few words
            host, event = stacked.cpu(), None
        pending._device.append((names, host, event))
    return pending
