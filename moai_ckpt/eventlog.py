"""A run's history of events under ``events/``: kept bounded, read bounded, summarised for ``moai-ckpt stats``.

Object stores have no append, so each event the history keeps is one small JSON object
(`moai_ckpt.layout.event_key`: names sort by time), written by the run's writer (the process
that holds its lease, rank 0). The history keeps snapshots, restores and replays; log flushes,
many per snapshot, only go to logging and hooks. It is bounded twice: the writer deletes the
oldest events beyond `MAX_EVENTS`, and a reader reads at most the newest `MAX_EVENTS`, each at
most `EVENT_RECORD_LIMIT` bytes. An event object that does not parse or validate is skipped
with a warning: a damaged history never stops a run or the CLI.
"""

from __future__ import annotations

import logging
import os
import statistics
import threading
import time
from collections.abc import Iterable
from typing import Any

from pydantic import ValidationError

from moai_ckpt.events import Event
from moai_ckpt.layout import EVENTS, event_key, parse_event_name
from moai_ckpt.storage import Storage

__all__ = ["EVENT_RECORD_LIMIT", "HISTORY_KINDS", "MAX_EVENTS", "EventHistory", "read_events", "summarize"]

log = logging.getLogger("moai_ckpt.events")

#: the most events a run directory keeps, and the most a reader reads
MAX_EVENTS = 4096
#: the largest event object read (an event is a few hundred bytes)
EVENT_RECORD_LIMIT = 4096
#: the kinds a run's history keeps
HISTORY_KINDS = frozenset({"save", "save_async", "restore", "replay"})
#: the writer trims the history after every this many events it writes
_TRIM_EVERY = 64


class EventHistory:
    """Writes the events a run's history keeps into its run directory (best effort).

    A failed write is logged once and never raised: observability must not stop a run.
    """

    def __init__(self, storage: Storage, rank: int = 0) -> None:
        self.storage = storage
        self.rank = rank
        self._written = 0
        self._warned = False
        self._lock = threading.Lock()

    def append(self, event: Event) -> None:
        """Write ``event`` as ``events/<time>-<rank>-<token>.json`` (if its kind is kept)."""
        if event.kind not in HISTORY_KINDS:
            return
        key = event_key(time.time_ns(), self.rank, os.urandom(4).hex())
        try:
            self.storage.write(key, event.model_dump_json(exclude_none=True).encode() + b"\n")
            with self._lock:
                self._written += 1
                trim = self._written % _TRIM_EVERY == 0
            if trim:
                self.trim()
        except Exception as exc:  # noqa: BLE001 - the history is best effort, the run goes on
            if not self._warned:
                self._warned = True
                log.warning("could not write to the event history of %s: %s", self.storage.url, exc)

    def trim(self, keep: int = MAX_EVENTS) -> None:
        """Delete the oldest events beyond the newest ``keep``."""
        keys = _event_keys(self.storage)
        if len(keys) > keep:
            self.storage.delete(keys[: len(keys) - keep])


def _event_keys(storage: Storage) -> list[str]:
    """Keys of ``events/``, oldest first; anything else there is ignored."""
    names = [key.rsplit("/", 1)[-1] for key in storage.list(EVENTS)]
    return [f"{EVENTS}/{name}" for name in sorted(n for n in names if parse_event_name(n) is not None)]


def read_events(storage: Storage, limit: int = MAX_EVENTS) -> list[Event]:
    """The newest ``limit`` events of a run's history, oldest first (damaged ones skipped, with a warning)."""
    events = []
    for key in _event_keys(storage)[-limit:]:
        try:
            events.append(Event.model_validate_json(storage.read_record(key, EVENT_RECORD_LIMIT)))
        except FileNotFoundError:
            continue  # trimmed meanwhile
        except (ValidationError, ValueError) as exc:
            log.warning("skipping event %s of %s: %s", key, storage.url, str(exc).splitlines()[0])
    return events


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _snapshots(events: list[Event]) -> dict[str, Any]:
    done = [e for e in events if e.ok]
    blocking = [e.stall_s for e in done]
    persist = [e.persist_s if e.persist_s is not None else e.duration_s for e in done]
    seconds = sum(e.duration_s for e in done)
    total = sum(e.bytes for e in done)
    return {
        "count": len(done),
        "failed": len(events) - len(done),
        "async": sum(1 for e in done if e.kind == "save_async"),
        "blocking_mean_s": _mean(blocking),
        "blocking_max_s": max(blocking, default=None),
        "persist_mean_s": _mean(persist),
        "persist_max_s": max(persist, default=None),
        "bytes": total,
        "gb_per_s": total / seconds / 1e9 if seconds > 0 else None,
        "last_step": max((e.step for e in done), default=None),
    }


def summarize(events: Iterable[Event]) -> dict[str, Any]:
    """A run's history in figures: snapshots, each restore and each replay (what ``moai-ckpt stats`` prints)."""
    events = list(events)
    saves = [e for e in events if e.kind in ("save", "save_async")]
    restores = [
        {"step": e.step, "tier": e.tier, "duration_s": e.duration_s, "bytes": e.bytes, "ok": e.ok, "error": e.error}
        for e in events
        if e.kind == "restore"
    ]
    replays = [
        {"step": e.step, "steps": e.steps or 0, "duration_s": e.duration_s, "ok": e.ok, "error": e.error}
        for e in events
        if e.kind == "replay"
    ]
    return {"events": len(events), "snapshots": _snapshots(saves), "restores": restores, "replays": replays}
