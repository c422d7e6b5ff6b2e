"""Host staging for asynchronous saves: a reusable pool of (pinned) host buffers.

`save_async` blocks only while the rank's tensors are copied into this pool; encoding, checksums,
writes and the commit run in the background from the pool's buffers. The pool keeps one buffer
per array name and reuses it while the name's shape and dtype stay the same, so host memory stays
at one copy of the rank's state, however many saves run. Buffers for CUDA tensors are pinned, so
the device-to-host copies run at full bandwidth and can all be queued before a single wait.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from moai_ckpt.digest import PendingDigests
from moai_ckpt.format import ObjectRecord
from moai_ckpt.sharding import Piece


class Stager(Protocol):
    """Copies tensors to host memory for a save that returns before it writes."""

    def __call__(self, name: str, tensor: torch.Tensor) -> torch.Tensor: ...

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

    Args:
        pin: pin buffers for CUDA tensors (default: when CUDA is available).
    """

    def __init__(self, pin: bool | None = None) -> None:
        self.pin = torch.cuda.is_available() if pin is None else pin
        self._buffers: dict[str, torch.Tensor] = {}
        self._used: set[str] = set()
        self._devices: set[torch.device] = set()
        self._lock = threading.Lock()

    def __call__(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Queue a copy of ``tensor`` into the buffer for ``name``; `wait` makes it complete."""
        tensor = tensor.detach()
        with self._lock:
            buf = self._buffers.get(name)
            if buf is None or buf.shape != tensor.shape or buf.dtype != tensor.dtype:
                pinned = self.pin and tensor.device.type == "cuda"
                buf = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=pinned)
                self._buffers[name] = buf
            self._used.add(name)
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
        with self._lock:
            for name in set(self._buffers) - self._used:
                del self._buffers[name]
            self._used.clear()

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def clear(self) -> None:
        with self._lock:
            self._buffers.clear()
            self._used.clear()
