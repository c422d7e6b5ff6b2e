"""Staging, the first phase of a save: one rank's state captured into host tensors ready to write.

`stage` captures the state (`moai_ckpt.capture`: encoded trees and the tensors they name), takes
this rank's piece of every tensor (`moai_ckpt.sharding.local_piece`: its rows of a sharded one),
and puts each piece in host memory: CPU tensors as they are, device tensors through the pinned
`HostPool`, all copies queued before one wait. Under several ranks it also starts the digests of
the tensors taken as replicated (`moai_ckpt.ranklocal` checks them). The result, `Staged`, is all
the later phases need.

`save_async` stages with a copy of every tensor (its `Stager`, `moai_ckpt.overlap.OverlapStager`):
CPU tensors are copied into the pool at once, the copies of CUDA tensors are only queued (they
overlap the next steps); encoding, checksums, writes and the commit run in the background from
the pool's buffers. The pool keeps one buffer per array name and reuses it while the name's shape
and dtype stay the same, so host memory stays at one copy of the rank's state, however many saves
run. Buffers for CUDA tensors are pinned, so the device-to-host copies run at full bandwidth
without the host waiting; pinning gigabytes takes seconds, so `HostPool.reserve` does it in a
background thread (`HostPool._allocate` is the one place that decides what a buffer is).
A pool made ``shared`` allocates its buffers in named shared memory (`moai_ckpt.shm`) instead,
so that a writer process (`moai_ckpt.persist`) reads them where they are; `HostPool.segment`
names a buffer's segment.

A `save_async` whose state keeps the structure of the previous one follows that save's capture
plan (`moai_ckpt.plan`): its names, pieces and devices, and its buffers while the pool's
`HostPool.generation` is the one they were taken at; CPU tensors are then copied in one call.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from moai_ckpt import faults, shm
from moai_ckpt.capture import RNG_KEY, Captured, capture
from moai_ckpt.digest import PendingDigests, digest_tensors
from moai_ckpt.dtypes import stored_dtype
from moai_ckpt.format import ObjectRecord
from moai_ckpt.plan import CapturePlan, PlanCache
from moai_ckpt.rng import GlobalRNG
from moai_ckpt.sharding import Piece, is_dtensor, local_piece
from moai_ckpt.tree import tensor_refs


class Stager(Protocol):
    """Copies tensors to host memory for a save that returns before it writes."""

    def __call__(self, name: str, tensor: torch.Tensor) -> torch.Tensor: ...

    def many(
        self, names: list[str], tensors: list[torch.Tensor], buffers: list[torch.Tensor] | None
    ) -> list[torch.Tensor]: ...

    def wait(self) -> None: ...


@dataclass
class Staged:
    """One rank's captured state, ready to persist."""

    step: int
    objects: dict[str, ObjectRecord]
    info: dict[str, Any]
    rng_key: str
    pieces: dict[str, Piece] = field(default_factory=dict)
    devices: dict[str, str] = field(default_factory=dict)
    host: dict[str, torch.Tensor] = field(default_factory=dict)
    #: arrays taken as replicated, whose digests the ranks compare (several ranks only)
    compare: list[str] = field(default_factory=list)
    device_digests: PendingDigests | None = None  # of the ``compare`` tensors that live on a device


class HostPool:
    """Reusable host buffers keyed by array name.

    A buffer is allocated by `_allocate` (the one place that decides what host memory is) either
    on the caller's thread, when a save needs it now, or in the background (`reserve`): pinning
    gigabytes takes seconds, and `save_async` must not block for it.

    Args:
        pin: pin buffers for CUDA tensors (default: when CUDA is available).
    """

    def __init__(self, pin: bool | None = None) -> None:
        self.pin = torch.cuda.is_available() if pin is None else pin
        self._shared = False
        #: most bytes the shared buffers may take together (None: what /dev/shm has)
        self.shared_limit: int | None = None
        self._buffers: dict[str, torch.Tensor] = {}
        self._pending: dict[str, Future[torch.Tensor]] = {}
        self._segments: dict[str, tuple[str, int]] = {}  # array name -> (segment, bytes), shared buffers
        self._used: set[str] = set()
        self._devices: set[torch.device] = set()
        self._lock = threading.Lock()
        self._allocator: ThreadPoolExecutor | None = None
        #: changes whenever a buffer is added or dropped: a `CapturePlan`'s buffers are the
        #: pool's while its generation is the pool's
        self.generation = 0
        #: the capture plan of the last save staged through this pool
        self.plans = PlanCache()

    @property
    def shared(self) -> bool:
        """Whether new buffers go to named shared memory (for a writer process); set between saves."""
        return self._shared

    @shared.setter
    def shared(self, value: bool) -> None:
        with self._lock:
            if value != self._shared:
                self._shared = value
                self.generation += 1  # a capture plan's buffers no longer live where saves need them

    def _allocate(self, name: str, shape: torch.Size, dtype: torch.dtype, pinned: bool) -> torch.Tensor:
        """A new host buffer for array ``name``: pinned for a device tensor's copies, or in a
        shared-memory segment when the pool is ``shared`` (then called with the lock held)."""
        if not self.shared:
            return torch.empty(shape, dtype=dtype, pin_memory=pinned)
        nbytes = shape.numel() * dtype.itemsize
        taken = sum(size for _, size in self._segments.values())
        if self.shared_limit is not None and taken + nbytes > self.shared_limit:
            raise OSError(errno.ENOSPC, f"shared host buffers would exceed {self.shared_limit} bytes")
        segment, mapping = shm.create(nbytes)
        self._segments[name] = (segment, nbytes)
        return shm.tensor(mapping, tuple(shape), dtype)

    def _free(self, name: str) -> None:
        """Drop the buffer for ``name`` (called with the lock held); its segment's name goes too."""
        if self._buffers.pop(name, None) is not None:
            self.generation += 1
        segment = self._segments.pop(name, None)
        if segment is not None:
            shm.unlink(segment[0])

    def segment(self, name: str) -> tuple[str, int] | None:
        """The shared-memory segment holding the buffer for ``name`` and its size, if shared."""
        with self._lock:
            return self._segments.get(name)

    def _pinned(self, tensor: torch.Tensor) -> bool:
        return self.pin and tensor.device.type == "cuda"

    def reserve(self, name: str, tensor: torch.Tensor) -> None:
        """Allocate the buffer for ``name`` in a background thread, unless one that fits exists or is coming."""
        with self._lock:
            if self.shared or self._fits(name, tensor) or name in self._pending:
                return  # shared buffers are made when a save needs them
            if self._allocator is None:
                self._allocator = ThreadPoolExecutor(1, thread_name_prefix="moai-pin")
            shape, dtype, pinned = tensor.shape, tensor.dtype, self._pinned(tensor)
            self._pending[name] = self._allocator.submit(self._allocate, name, shape, dtype, pinned)

    def ready(self, name: str, tensor: torch.Tensor, *, start: bool = True) -> torch.Tensor | None:
        """The buffer for ``name`` if it is allocated and fits ``tensor`` (marked used); else None,
        and (with ``start``) its allocation is started in the background. Never blocks."""
        with self._lock:
            self._collect(name)
            if self._fits(name, tensor):
                self._used.add(name)
                return self._buffers[name]
        if start:
            self.reserve(name, tensor)
        return None

    def buffer(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """The buffer for ``name`` that fits ``tensor`` (marked used): waits for its background
        allocation, or allocates it now."""
        with self._lock:
            pending = self._pending.get(name)
        if pending is not None:
            pending.result()
        with self._lock:
            self._collect(name)
            if not self._fits(name, tensor):
                self._free(name)
                self._buffers[name] = self._allocate(name, tensor.shape, tensor.dtype, self._pinned(tensor))
                self.generation += 1
            self._used.add(name)
            return self._buffers[name]

    def _collect(self, name: str) -> None:
        """Move a finished background allocation into the buffers (under the lock)."""
        pending = self._pending.get(name)
        if pending is not None and pending.done():
            del self._pending[name]
            self._buffers[name] = pending.result()
            self.generation += 1

    def _fits(self, name: str, tensor: torch.Tensor) -> bool:
        """The buffer for ``name`` exists, fits ``tensor`` and lives where the pool puts buffers now
        (shared memory or not); called with the lock held."""
        buf = self._buffers.get(name)
        return (
            buf is not None
            and buf.shape == tensor.shape
            and buf.dtype == tensor.dtype
            and (name in self._segments) == self.shared
        )

    def __call__(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Queue a copy of ``tensor`` into the buffer for ``name``; `wait` makes it complete."""
        tensor = tensor.detach()
        buf = self.buffer(name, tensor)
        if tensor.device.type == "cuda":
            buf.copy_(tensor, non_blocking=buf.is_pinned())
            self._devices.add(tensor.device)
        else:
            buf.copy_(tensor)
        return buf

    def wait(self) -> None:
        """Complete every queued copy, and free buffers this round did not use."""
        for device in self._devices:
            torch.cuda.current_stream(device).synchronize()
        self._devices.clear()
        self.release_unused()

    def release_unused(self) -> None:
        """Free the buffers this round did not use (the state lost an array or changed its shape)."""
        with self._lock:
            for name in set(self._buffers) - self._used:
                self._free(name)
            self._used.clear()

    def reuse(self, names: list[str], generation: int) -> bool:
        """Mark the buffers of ``names`` used if the pool is still at ``generation`` (when a plan
        took them from it: they are then still the pool's and fit); else False, nothing marked."""
        with self._lock:
            if generation != self.generation or self._pending:
                return False
            self._used.update(names)
            return True

    def holds(self, names: list[str], buffers: list[torch.Tensor]) -> int | None:
        """The pool's generation if ``buffers`` are its buffers of ``names`` (None otherwise)."""
        with self._lock:
            if self._pending or any(self._buffers.get(n) is not b for n, b in zip(names, buffers, strict=True)):
                return None
            return self.generation

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def clear(self) -> None:
        """Drop every buffer (background allocations finish first)."""
        if self._allocator is not None:
            self._allocator.shutdown(wait=True, cancel_futures=True)
            self._allocator = None
        with self._lock:
            for name in list(self._buffers):
                self._free(name)
            self._pending.clear()
            self._used.clear()
            self.generation += 1
        self.plans.clear()


def rng_key(rank: int) -> str:
    """The state entry that holds ``rank``'s global RNG states."""
    return RNG_KEY if rank == 0 else f"{RNG_KEY}.{rank}"


def host_tensor(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor with ``t``'s contents (no copy when ``t`` already is one)."""
    t = t.detach()
    if t.is_conj() or t.is_neg():  # lazy conjugate / negative views have no bytes of their own yet
        t = t.resolve_conj().resolve_neg()
    if t.device.type != "cpu":
        t = t.to("cpu")
    return t if t.is_contiguous() else t.contiguous()


def stage(
    step: int,
    state: Mapping[str, Any],
    info: Mapping[str, Any] | None,
    *,
    rank: int,
    world_size: int,
    capture_rng: bool,
    pool: HostPool,
    copy: Stager | None = None,
) -> Staged:
    """Capture ``state`` on this rank: its pieces of every array, as contiguous host tensors.

    With ``copy`` every host tensor is a copy (for a save that returns before it writes).
    Otherwise CPU tensors are written straight from the live memory, and device tensors go
    through the pinned staging ``pool``: all copies queued, one wait.
    """
    faults.point("snapshot.stage")
    key = rng_key(rank)
    rng = GlobalRNG() if capture_rng else None
    plan: CapturePlan | None = None
    if copy is not None:
        captured, plan = pool.plans.capture(state, rng=rng, rng_key=key)
    else:
        captured = capture(state, rng=rng, rng_key=key)
    staged = Staged(step=step, objects=captured.objects, info=dict(info or {}), rng_key=key)
    if plan is not None and copy is not None:
        _copy_planned(captured, plan, staged, pool, copy)
        if world_size > 1:
            _start_digests(captured, staged)
        copy.wait()
        if not plan.buffers:
            _keep_buffers(plan, staged, pool)
        return staged
    pooled = False
    for name, tensor in captured.tensors.items():
        shape, start, stop, local = local_piece(tensor)
        staged.pieces[name] = Piece(stored_dtype(tensor.dtype, key=name).logical, shape, start, stop)
        staged.devices[name] = str(tensor.device)
        if copy is not None:
            staged.host[name] = copy(name, local)
        elif local.device.type == "cuda":
            staged.host[name], pooled = pool(name, local), True
        else:
            staged.host[name] = host_tensor(local)
    if world_size > 1:
        _start_digests(captured, staged)
    if copy is not None:
        copy.wait()
    elif pooled:
        pool.wait()
    return staged


def _copy_planned(captured: Captured, plan: CapturePlan, staged: Staged, pool: HostPool, copy: Stager) -> None:
    """Stage a capture that followed ``plan``: pieces and devices as the plan has them, copies into
    the plan's buffers while they still are the pool's (else looked up one by one)."""
    staged.pieces = dict(plan.pieces)
    staged.devices = dict(plan.devices)
    tensors = [captured.tensors[name] for name in plan.names]
    reused = bool(plan.buffers) and pool.reuse(plan.names, plan.generation)
    if not reused:
        plan.buffers = []
    hosts = copy.many(plan.names, tensors, plan.buffers if reused else None)
    staged.host = dict(zip(plan.names, hosts, strict=True))


def _keep_buffers(plan: CapturePlan, staged: Staged, pool: HostPool) -> None:
    """Remember the buffers a save staged into, for the next save that follows ``plan``."""
    hosts = [staged.host[name] for name in plan.names]
    generation = pool.holds(plan.names, hosts)
    if generation is not None:
        plan.buffers, plan.generation = hosts, generation


def reserve(state: Mapping[str, Any], *, pool: HostPool, rank: int) -> None:
    """Start allocating, in the background, the pool's buffers for ``state``'s device tensors."""
    captured = capture(state, rng=None, rng_key=rng_key(rank))
    for name, tensor in captured.tensors.items():
        local = local_piece(tensor)[3]
        if local.device.type == "cuda":
            pool.reserve(name, local)


def _start_digests(captured: Captured, staged: Staged) -> None:
    """Choose the tensors taken as replicated (not DTensors, not this rank's RNG state), whose
    digests the ranks compare, and queue the digests of those on a device (read in `replica_digests`)."""
    own = set(tensor_refs(captured.objects[staged.rng_key].tree)) if staged.rng_key in captured.objects else set()
    staged.compare = [n for n, t in captured.tensors.items() if n not in own and not is_dtensor(t)]
    on_device = [(n, captured.tensors[n]) for n in staged.compare if captured.tensors[n].device.type != "cpu"]
    staged.device_digests = digest_tensors(on_device)


def replica_digests(staged: Staged) -> dict[str, str]:
    """Array -> an exact digest of this rank's copy (with its dtype and shape), for the arrays
    taken as replicated. CPU tensors are digested from their host copies here (off the
    training thread for `save_async`); device tensors' digests were queued by `stage`."""
    if not staged.compare:
        return {}
    on_host = [(n, staged.host[n]) for n in staged.compare if staged.devices[n] == "cpu"]
    found = digest_tensors(on_host).wait()
    if staged.device_digests is not None:
        found |= staged.device_digests.wait()
    return {n: f"{staged.pieces[n].dtype}{list(staged.pieces[n].shape)}:{found[n]}" for n in staged.compare}
