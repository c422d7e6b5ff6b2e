"""Where a step's log work runs on CUDA: a side stream, and the waits that keep its reads exact.

At a step's end the training thread queues the norms and the state digests on a side stream that
first waits for everything queued so far on the training stream (so they read the state as the
step left it), records events, and goes on; nothing on the training thread waits for the device.
The reads must also end before anything writes what they read, so the training stream waits (on
the device, not the host) for:

- the *early* event, when the next step begins: tensors anyone may write (buffers, the state of
  objects other than optimizers) are read before the next step's first kernel;
- the *late* event, when a tracked optimizer's step begins (a step pre-hook): its parameters and
  its state, which only its step writes, are read while the next forward and backward run. With
  no tracked optimizer, the next step's beginning waits for both.

So a tensor a tracked optimizer steps must not be written by anything else between a step's end
and that optimizer's next step (an EMA copied into the live weights belongs after the optimizer
step). On CPU all of this is nothing: the work is done on the training thread, in order.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

__all__ = ["LogStream"]


class LogStream:
    """The side stream of one run's log work on CUDA, its events, and the waits on them."""

    def __init__(self) -> None:
        self.stream: torch.cuda.Stream | None = None
        self.active: torch.cuda.Stream | None = None  # the side stream while work is queued on it
        self.early: torch.cuda.Event | None = None
        self.late: torch.cuda.Event | None = None
        self._hooks: dict[int, RemovableHandle] = {}

    @contextmanager
    def side(self, device: torch.device) -> Iterator[None]:
        """Queue what the block queues on the side stream, after the training stream's work so far."""
        if device.type != "cuda":
            yield
            return
        if self.stream is None or self.stream.device != device:
            self.stream = torch.cuda.Stream(device)
        self.stream.wait_stream(torch.cuda.current_stream(device))
        self.active = self.stream
        try:
            with torch.cuda.stream(self.stream):
                yield
        finally:
            self.active = None

    def keep(self, *tensors: Any) -> None:
        """Tensors of the training stream read on the side stream: their memory waits for those reads."""
        if self.active is not None:
            for t in tensors:
                if isinstance(t, torch.Tensor) and t.device.type == "cuda" and not hasattr(t, "to_local"):
                    t.record_stream(self.active)

    def mark_early(self) -> None:
        """The reads the next step's beginning waits for are queued."""
        if self.active is not None:
            self.early = self.active.record_event()

    def mark_late(self) -> None:
        """The reads a tracked optimizer's next step waits for are queued."""
        if self.active is not None:
            self.late = self.active.record_event()

    def guard(self, state: Mapping[str, Any]) -> None:
        """Make every optimizer in ``state`` wait for the late reads before its step (once each)."""
        for obj in state.values():
            if isinstance(obj, torch.optim.Optimizer) and id(obj) not in self._hooks:
                self._hooks[id(obj)] = obj.register_step_pre_hook(self._before_optimizer_step)

    def _before_optimizer_step(self, *_: Any) -> None:
        if self.late is not None and self.stream is not None:
            torch.cuda.current_stream(self.stream.device).wait_event(self.late)

    def before_step(self) -> None:
        """A step begins: the training stream waits for the early reads (and the late ones without a guard)."""
        for event in (self.early, None if self._hooks else self.late):
            if event is not None and self.stream is not None:
                torch.cuda.current_stream(self.stream.device).wait_event(event)
        self.early = None
        if not self._hooks:
            self.late = None

    def close(self) -> None:
        """Remove the optimizer hooks."""
        for handle in self._hooks.values():
            handle.remove()
        self._hooks.clear()
