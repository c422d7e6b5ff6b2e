"""Overlapped staging: `save_async` queues its device-to-host copies and returns; training goes on.

`OverlapStager` is the `Stager` of `Checkpointer.save_async`. For a CUDA tensor it queues a
copy into the tensor's pinned buffer of the `HostPool` and returns without waiting:

- tensors that only an optimizer step writes (the parameters of the modules in the state and the
  optimizers' state tensors, when the state holds an optimizer) are copied on a side stream, so
  the copies overlap the next forward and backward. A global optimizer step pre-hook makes the
  stream the step runs on wait for them (on the device: the host never blocks) before any
  optimizer writes a parameter;
- every other device tensor (buffers, which a forward updates in place; tensors of plain dicts)
  is copied on the current stream, where anything queued after it is ordered after the copy;
- a tensor whose pinned buffer is still being allocated in the background (the first save of a
  process) is cloned on the device instead (ordered on the current stream, a few milliseconds
  of device time) when the device has the memory to spare, and copied to host memory once its
  buffer is ready; without the memory the call waits for the allocation (logged).

CPU tensors are copied at once, as before (a host copy is cheap, and nothing could overlap it).

Bitwise content stays guaranteed: the version counter (``tensor._version``) of every tensor
copied on the side stream is recorded at the call. A write outside an optimizer step that lands
before the copy is known complete (checked when a guard runs, when the persist is about to read
the copies, and at the next step boundary of a `Run`) fails the snapshot with
`StagingRaceError`, never lets it through with wrong content. `Checkpointer.wait_staged` is the
explicit wait before such a write.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from moai_ckpt.errors import StagingRaceError
from moai_ckpt.sharding import is_dtensor
from moai_ckpt.staging import HostPool, Staged

log = logging.getLogger("moai_ckpt")

#: device memory left free when cloning tensors whose pinned buffers are not allocated yet
CLONE_MARGIN_BYTES = 512 << 20

StorageKey = tuple[int, int]


def _storage_key(tensor: torch.Tensor) -> StorageKey | None:
    """The device index and storage address of ``tensor`` (of its local shard, for a DTensor).

    Computed from the tensor's own pointer and offset (no storage object is built: this runs for
    every tensor of the state on the calling thread); -1 is the CPU's index.
    """
    try:
        local = tensor.to_local() if is_dtensor(tensor) else tensor
        return local.get_device(), local.data_ptr() - int(local.storage_offset()) * local.element_size()
    except (RuntimeError, TypeError, AttributeError):
        return None


def optimizer_written(state: Mapping[str, Any]) -> set[StorageKey]:
    """Storages that only an optimizer step writes: the modules' parameters and the optimizers'
    state tensors, when ``state`` holds an optimizer (empty otherwise: no guard would run)."""
    optimizers = [v for v in state.values() if isinstance(v, torch.optim.Optimizer)]
    if not optimizers:
        return set()
    tensors: list[torch.Tensor] = []
    for value in state.values():
        if isinstance(value, torch.nn.Module):
            tensors += list(value.parameters())
    for opt in optimizers:
        tensors += [p for group in opt.param_groups for p in group["params"]]
        for per_param in opt.state.values():
            tensors += [t for t in per_param.values() if isinstance(t, torch.Tensor)]
    keys = {_storage_key(t) for t in tensors if t.device.type == "cuda"}
    keys.discard(None)
    return keys  # type: ignore[return-value]


def pack(tensors: list[torch.Tensor], align: int = 256) -> list[torch.Tensor]:
    """Copies of ``tensors`` (contiguous, same shapes and dtypes) in one allocation per device:
    one allocator call, not one per tensor, for a first save that clones a whole state."""
    clones: list[torch.Tensor] = [torch.empty(0)] * len(tensors)
    for device in {t.device for t in tensors}:
        mine = [(i, t) for i, t in enumerate(tensors) if t.device == device]
        offsets, total = [], 0
        for _, t in mine:
            offsets.append(total)
            total += -(-t.numel() * t.element_size() // align) * align
        flat = torch.empty(total, dtype=torch.uint8, device=device)
        for (i, t), start in zip(mine, offsets, strict=True):
            clones[i] = flat[start : start + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
        copy_all([(clones[i], t) for i, t in mine])
    return clones


def copy_all(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Queue ``buffer.copy_(source, non_blocking=True)`` for every pair on the current stream, in
    one call where torch allows (no Python work per tensor on the training thread)."""
    if not pairs:
        return
    buffers, sources = [b for b, _ in pairs], [s for _, s in pairs]
    try:
        torch._foreach_copy_(buffers, sources, non_blocking=True)
    except (RuntimeError, TypeError, NotImplementedError):  # a torch without it for these devices
        for buf, source in pairs:
            buf.copy_(source, non_blocking=True)


@dataclass
class _Copy:
    name: str
    source: torch.Tensor
    buffer: torch.Tensor


@dataclass
class PendingCopies:
    """The copies of one `save_async` still on their way to host memory."""

    step: int
    #: per device: the event after the side stream's copies, the event after the current stream's
    side_done: dict[torch.device, torch.cuda.Event] = field(default_factory=dict)
    current_done: dict[torch.device, torch.cuda.Event] = field(default_factory=dict)
    streams: dict[torch.device, torch.cuda.Stream] = field(default_factory=dict)
    #: copied on the side stream: their sources stay referenced until the copies are complete
    overlapped: list[_Copy] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    #: cloned on the device, waiting for their pinned buffers: name -> clone
    deferred: dict[str, torch.Tensor] = field(default_factory=dict)
    guarded: set[int] = field(default_factory=set)  # streams (ids) made to wait for the copies
    #: the versions were compared at a moment the copies were complete or ordered before any write
    checked: bool = False
    races: list[str] = field(default_factory=list)
    #: seconds the call spent queueing the device copies (clones included)
    queue_s: float = 0.0
    done: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _check(self) -> None:
        """Compare the versions once (under the lock): a change before this moment is a race."""
        if not self.checked:
            self.checked = True
            self.races += self._changed()

    def _changed(self) -> list[str]:
        return [
            f"{c.name} (version {v} -> {c.source._version})"
            for c, v in zip(self.overlapped, self.versions, strict=True)
            if c.source._version != v
        ]

    def guard(self) -> None:
        """Before anything writes a tracked tensor (on the training thread): the current stream of
        each device waits for the side stream's copies; a tensor already changed is a race."""
        with self.lock:
            if self.done:
                return
            for device, event in self.side_done.items():
                stream = torch.cuda.current_stream(device)
                if stream.stream_id in self.guarded:
                    continue
                self._check()
                stream.wait_event(event)
                self.guarded.add(stream.stream_id)

    def finish(self, staged: Staged, pool: HostPool, url: str) -> None:
        """Complete the copies (in the persist, before anything reads them) and check that no
        tracked tensor changed under them; drop the references to the device tensors.

        Raises:
            StagingRaceError: a tracked tensor was written before its copy was known complete.
        """
        for event in [*self.side_done.values(), *self.current_done.values()]:
            event.synchronize()
        if self.deferred:
            self._copy_deferred(staged, pool)
        with self.lock:
            self._check()
            self.done = True
            self.overlapped.clear()
            races = list(self.races)
        if races:
            raise StagingRaceError(
                f"{len(races)} tracked tensor(s) changed in place while being copied to host memory, "
                f"outside an optimizer step (first: {races[0]}); call Checkpointer.wait_staged() "
                "before writing tracked tensors outside an optimizer step",
                url=url,
                step=self.step,
                key=races[0].split(" ")[0],
            )

    def _copy_deferred(self, staged: Staged, pool: HostPool) -> None:
        """The first save's clones, once their pinned buffers are allocated (this thread waits)."""
        devices = set()
        for name, clone in self.deferred.items():
            buf = pool.buffer(name, clone)
            stream = self.streams[clone.device]
            with torch.cuda.stream(stream):
                buf.copy_(clone, non_blocking=buf.is_pinned())
            devices.add(clone.device)
            staged.host[name] = buf
        for device in devices:
            self.streams[device].synchronize()
        self.deferred.clear()

    def wait(self) -> None:
        """Block until every copy reached host memory (deferred clones are private: not waited);
        writes after this are safe."""
        for event in [*self.side_done.values(), *self.current_done.values()]:
            event.synchronize()
        with self.lock:
            self._check()


class OverlapStager:
    """The `Stager` of `save_async`: queues the copies, returns, guards the writes after it.

    Args:
        pool: the host buffers.
    """

    def __init__(self, pool: HostPool) -> None:
        self.pool = pool
        self.pending: PendingCopies | None = None
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._guarded_keys: set[StorageKey] = set()
        self._queued: list[tuple[str, torch.Tensor, torch.Tensor | None]] = []
        self._hook: Any = None

    def begin(self, step: int, state: Mapping[str, Any]) -> None:
        """A save of ``state`` at ``step`` starts: which tensors only an optimizer writes."""
        self._guarded_keys = optimizer_written(state) if torch.cuda.is_available() else set()
        self._queued = []
        self.pending = PendingCopies(step)

    def __call__(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """The host tensor that will hold ``tensor``'s bytes (CPU tensors: copied now)."""
        tensor = tensor.detach()
        if tensor.device.type != "cuda":
            return self.pool(name, tensor)
        # a missing buffer is allocated only once every copy is queued (`wait`): pinning in the
        # background while this thread allocates device memory slows both
        buf = self.pool.ready(name, tensor, start=False)
        self._queued.append((name, tensor, buf))
        return buf if buf is not None else tensor  # a deferred one's host tensor is set by `finish`

    def many(
        self, names: list[str], tensors: list[torch.Tensor], buffers: list[torch.Tensor] | None
    ) -> list[torch.Tensor]:
        """The host tensors of ``tensors``, as from calling this stager on each; with ``buffers``
        (the pool's buffers of ``names``, already marked used) CPU tensors are copied in one call."""
        if buffers is None:
            return [self(name, tensor) for name, tensor in zip(names, tensors, strict=True)]
        on_host: list[tuple[torch.Tensor, torch.Tensor]] = []
        for name, tensor, buf in zip(names, tensors, buffers, strict=True):
            if tensor.device.type == "cuda":
                self._queued.append((name, tensor.detach(), buf))
            else:
                on_host.append((buf, tensor.detach()))
        copy_all(on_host)
        return list(buffers)

    def wait(self) -> None:
        """Queue every device copy (returns without waiting for them), and arm the guard."""
        pending = self.pending
        assert pending is not None
        started = time.perf_counter()
        queued, self._queued = self._queued, []
        devices = {t.device for _, t, _ in queued}
        for device in devices:
            stream = self._streams.get(device)
            if stream is None:
                stream = self._streams[device] = torch.cuda.Stream(device)
            pending.streams[device] = stream
            stream.wait_stream(torch.cuda.current_stream(device))  # what the capture computed
        missing = [(name, t) for name, t, buf in queued if buf is None]
        if self._clones_fit([t for _, t in missing]):
            pending.deferred = dict(zip([name for name, _ in missing], pack([t for _, t in missing]), strict=True))
        ordered: list[tuple[torch.Tensor, torch.Tensor]] = []  # (buffer, source) on the current stream
        for name, tensor, buf in queued:
            if name in pending.deferred:
                continue
            if buf is None:
                log.info("save_async of step %d waits for the pinned buffer of %s", pending.step, name)
                buf = self.pool.buffer(name, tensor)
            if _storage_key(tensor) in self._guarded_keys:
                pending.overlapped.append(_Copy(name, tensor, buf))
                pending.versions.append(tensor._version)
            else:
                ordered.append((buf, tensor))
        copy_all(ordered)
        for device in devices:
            with torch.cuda.stream(pending.streams[device]):
                copy_all([(c.buffer, c.source) for c in pending.overlapped if c.source.device == device])
        for device in devices:
            pending.current_done[device] = torch.cuda.current_stream(device).record_event()
            if pending.overlapped:
                pending.side_done[device] = pending.streams[device].record_event()
        if pending.overlapped:
            self._arm()
        self.pool.release_unused()
        for name, tensor in missing:
            self.pool.reserve(name, tensor)  # no-op for those allocated above
        pending.queue_s = time.perf_counter() - started

    def _clones_fit(self, tensors: list[torch.Tensor]) -> bool:
        """Whether the device has the memory to clone ``tensors`` (those without a pinned buffer yet)."""
        if not tensors:
            return False
        for device in {t.device for t in tensors}:
            need = sum(t.numel() * t.element_size() for t in tensors if t.device == device)
            free, _ = torch.cuda.mem_get_info(device)
            spare = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
            if need + CLONE_MARGIN_BYTES > free + spare:
                return False
        return True

    def _arm(self) -> None:
        """Register the global optimizer step pre-hook once (it holds this stager weakly)."""
        if self._hook is not None:
            return
        ref = weakref.ref(self)

        def before_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            stager = ref()
            if stager is not None:
                stager.guard()

        self._hook = register_optimizer_step_pre_hook(before_optimizer_step)

    def guard(self) -> None:
        """Make the current streams wait for the copies in flight (a no-op once they are complete)."""
        pending = self.pending
        if pending is not None and not pending.done:
            pending.guard()

    def close(self) -> None:
        """Remove the optimizer hook (on the thread that trains: hooks are not thread-safe)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
