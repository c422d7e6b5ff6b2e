"""Structured events: what each snapshot, restore, replay and log flush cost, as one small record each.

An `Event` says what happened (``kind``), at which step, how long it took, how many bytes it
moved, how long the training thread was blocked (``stall_s``), where the state came from or went
to (``tier``), and whether it worked. `EventSink.emit` sends each event to:

- Python logging: the logger ``moai_ckpt.events``, one INFO line per event, the fields in the
  record's ``extra`` (``record.moai_event`` is the `Event`, ``record.moai_<field>`` each field);
- every hook added with `add_hook` (process-wide) and the sink's own (``on_event=``);
- the run directory, for the kinds a run's history keeps (`moai_ckpt.eventlog`).

A hook that raises never reaches the training loop: its first failure is logged with its
traceback, later ones are counted silently.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from moai_ckpt.errors import redact_url

__all__ = [
    "KINDS",
    "Event",
    "EventHook",
    "EventKind",
    "EventSink",
    "add_hook",
    "hooks",
    "remove_hook",
]

log = logging.getLogger("moai_ckpt.events")

EventKind = Literal["save", "save_async", "restore", "replay", "log_flush"]
KINDS: tuple[str, ...] = ("save", "save_async", "restore", "replay", "log_flush")


class Event(BaseModel):
    """One snapshot, restore, replay or log flush, as it went.

    Attributes:
        kind: ``save``, ``save_async``, ``restore``, ``replay`` or ``log_flush``.
        step: the snapshot's step; for a replay the step it ended at; for a flush the last step written.
        duration_s: wall time from start to end (for ``save_async``: call to commit).
        bytes: bytes written or read (tensor bytes of a snapshot, bytes of a log segment).
        stall_s: how long the training thread was blocked by it.
        persist_s: ``save_async`` only: the background part (encode, write, commit).
        tier: where the state went or came from: ``storage`` (the run directory) or ``memory`` (a
            local tier, `moai_ckpt.run.tiers`).
        url: the run directory, its password redacted.
        ok: whether it succeeded.
        error: the class name of the error when it did not.
        steps: ``replay`` only: how many logged steps were replayed.
        rank: the process that emitted it.
        time: when it ended (seconds since the epoch).
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    kind: EventKind
    step: int = Field(ge=0)
    duration_s: float = Field(ge=0)
    bytes: int = Field(default=0, ge=0)
    stall_s: float = Field(default=0.0, ge=0)
    persist_s: float | None = Field(default=None, ge=0)
    tier: str = Field(default="storage", max_length=32)
    url: str = Field(default="", max_length=1024)
    ok: bool = True
    error: str | None = Field(default=None, max_length=200)
    steps: int | None = Field(default=None, ge=0)
    rank: int = Field(default=0, ge=0)
    time: float = Field(default_factory=time.time)

    def scalars(self) -> dict[str, float]:
        """The numeric fields, as a scalar logger takes them (``ok`` as 1.0 or 0.0)."""
        values: dict[str, float] = {
            "duration_s": self.duration_s,
            "bytes": float(self.bytes),
            "stall_s": self.stall_s,
            "ok": 1.0 if self.ok else 0.0,
        }
        if self.persist_s is not None:
            values["persist_s"] = self.persist_s
        if self.steps is not None:
            values["steps"] = float(self.steps)
        if self.bytes and self.duration_s > 0:
            values["gb_per_s"] = self.bytes / self.duration_s / 1e9
        return values

    def message(self) -> str:
        """The one line the ``moai_ckpt.events`` logger prints."""
        parts = [f"{self.kind} step {self.step}", f"{self.duration_s:.3f} s", f"stall {self.stall_s:.3f} s"]
        if self.persist_s is not None:
            parts.append(f"persist {self.persist_s:.3f} s")
        if self.bytes:
            parts.append(f"{self.bytes} B")
        if self.steps is not None:
            parts.append(f"{self.steps} steps")
        parts.append(f"tier {self.tier}")
        parts.append("ok" if self.ok else f"failed ({self.error})")
        return f"{', '.join(parts)} [{self.url}]"


class EventHook(Protocol):
    """Anything called with each `Event`."""

    def __call__(self, event: Event, /) -> None: ...


_hooks: list[EventHook] = []
_failed: dict[int, int] = {}  # id(hook) -> failures seen (the first one is logged)
_lock = threading.Lock()


def add_hook(hook: EventHook) -> Callable[[], None]:
    """Call ``hook(event)`` with every event of this process; returns a function that removes it.

    Hooks run on the thread that emits: the training thread, or the background thread of a
    ``save_async`` (its event is emitted once the snapshot is committed).
    """
    with _lock:
        _hooks.append(hook)
    return lambda: remove_hook(hook)


def remove_hook(hook: EventHook) -> None:
    """Stop calling ``hook`` (nothing happens if it was not added)."""
    with _lock:
        if hook in _hooks:
            _hooks.remove(hook)


def hooks() -> list[EventHook]:
    """The hooks added with `add_hook`, in order."""
    with _lock:
        return list(_hooks)


def _call(hook: EventHook, event: Event) -> None:
    """``hook(event)``; a failure is logged once per hook and never raised (training goes on)."""
    try:
        hook(event)
    except Exception:  # an observer must never break the training loop
        with _lock:
            count = _failed[id(hook)] = _failed.get(id(hook), 0) + 1
        if count == 1:
            log.warning(
                "event hook %r failed; it keeps being called, later failures are not logged", hook, exc_info=True
            )


class EventSink:
    """Where the events of one run directory go (one per `moai_ckpt.Checkpointer`).

    Args:
        url: the run directory (its password is redacted in every event).
        rank: this process's rank.
        on_event: hooks of this sink alone, called after the process-wide ones.
        store: called with each event the run's history keeps (set by the Checkpointer).
        tier: the tier of this sink's events unless one says otherwise (``memory`` for a local tier).
    """

    def __init__(
        self,
        url: str,
        rank: int = 0,
        on_event: EventHook | Iterable[EventHook] | None = None,
        store: Callable[[Event], None] | None = None,
        tier: str = "storage",
    ) -> None:
        self.url = redact_url(url)
        self.tier = tier
        self.rank = rank
        self.on_event: list[EventHook] = (
            [] if on_event is None else [on_event] if callable(on_event) else list(on_event)
        )
        self.store = store

    def emit(self, kind: EventKind, step: int, duration_s: float, **fields: Any) -> Event | None:
        """Build the event and send it everywhere (see the module docstring); returns it.

        Never raises: an event that cannot be built (a bug) is logged and dropped.
        """
        try:
            fields.setdefault("tier", self.tier)
            event = Event(kind=kind, step=step, duration_s=max(duration_s, 0.0), url=self.url, rank=self.rank, **fields)
        except ValueError as exc:  # pydantic's ValidationError: the operation itself must go on
            log.warning("dropped a %s event of step %r: %s", kind, step, exc)
            return None
        extra = {"moai_event": event, **{f"moai_{name}": value for name, value in event.model_dump().items()}}
        log.info("%s", event.message(), extra=extra)
        for hook in (*hooks(), *self.on_event):
            _call(hook, event)
        if self.store is not None:
            self.store(event)
        return event

    def failed(self, kind: EventKind, step: int, started: float, error: BaseException, **fields: Any) -> Event | None:
        """Emit the event of an operation that raised ``error`` (started at ``perf_counter`` ``started``)."""
        return self.emit(kind, step, time.perf_counter() - started, ok=False, error=type(error).__name__, **fields)
