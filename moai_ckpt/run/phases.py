"""The phases of a restart, timed: detection, process start, process group, setup, restore, replay.

`RecoveryClock` takes wall-clock marks as a run starts (Unix time, so that they compare with the
previous incarnation's log records and lease renewals, and with this process's start time) and
turns them into a `RecoveryPhases` for the replay report. The import mark is taken when this
module is first imported, which `moai_ckpt.run` does: by then Python, torch and moai-ckpt are
loaded.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from moai_ckpt.lease import live_lease
from moai_ckpt.storage import Storage
from replay.check import RecoveryPhases

__all__ = ["IMPORTED_AT", "RecoveryClock", "last_sign_of_life", "process_started_at"]

#: when moai-ckpt's run package was imported (Unix time)
IMPORTED_AT = time.time()


def process_started_at() -> float | None:
    """This process's start (Unix time), from ``/proc`` on Linux (to a clock tick); None elsewhere."""
    try:
        with open("/proc/self/stat", "rb") as f:
            # the command name (field 2) may hold spaces: count fields after its closing parenthesis
            started_ticks = int(f.read().rsplit(b")", 1)[1].split()[19])
        with open("/proc/uptime", "rb") as f:
            uptime = float(f.read().split()[0])
        now = time.time()
    except (OSError, ValueError, IndexError):
        return None
    # the boot time in /proc/stat is whole seconds: the uptime, to a hundredth, places the start closer
    return now - (uptime - started_ticks / os.sysconf("SC_CLK_TCK"))


def last_sign_of_life(storage: Storage) -> float | None:
    """When the run's writer was last seen alive: its lease's last renewal (None if released or expired).

    Read before this process takes the lease over. The heartbeat renews it every third of its
    TTL, so this is a bound; the log's last record (`RecoveryClock.saw`) is usually closer.
    """
    try:
        lease = live_lease(storage)
    except Exception:  # noqa: BLE001 - a report's detail is never worth failing a restart
        return None
    return lease.renewed_at if lease is not None else None


@dataclass
class RecoveryClock:
    """Marks taken as a run starts; `phases` turns them into the report's `RecoveryPhases`."""

    started: float | None = field(default_factory=process_started_at)
    imported: float = IMPORTED_AT
    built: float = field(default_factory=time.time)  # the Run and its process groups exist
    restoring: float | None = None
    restored: float | None = None
    last_seen: float | None = None  # the previous incarnation's last sign of life

    def saw(self, when: float | None) -> None:
        """The previous incarnation was alive at ``when`` (the newest sign wins)."""
        if when is not None and (self.last_seen is None or when > self.last_seen):
            self.last_seen = when

    def restore_begins(self) -> None:
        self.restoring = time.time()

    def restore_ends(self) -> None:
        self.restored = time.time()

    def phases(self, *, tier: str, restore_bytes: int, replayed: int, replay_s: float) -> RecoveryPhases:
        """The restart's phases, as live training begins now."""
        now = time.time()
        start, restoring = self.started, self.restoring
        return RecoveryPhases(
            detection_s=_span(self.last_seen, start),
            start_s=_span(start, self.imported),
            process_group_s=_span(self.imported, self.built),
            setup_s=_span(self.built, restoring),
            restore_s=_span(restoring, self.restored) or 0.0,
            restore_tier=tier,
            restore_bytes=restore_bytes,
            replay_s=replay_s,
            replayed_steps=replayed,
            total_s=_span(start, now),
        )


def _span(begin: float | None, end: float | None) -> float | None:
    """Seconds from ``begin`` to ``end``; None when either is unknown or they are out of order."""
    if begin is None or end is None or end < begin:
        return None
    return end - begin
