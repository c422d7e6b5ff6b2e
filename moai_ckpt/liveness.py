"""Who a writer is, and whether its process still lives: the identity a lease and a claim record.

A writer is named by a random owner id (one per process, a fork gets its own), its host, the
kernel boot and pid namespace it runs in, its pid and that pid's start time, and its
torchelastic job and restart count. From that record another process on the same host (same
boot and pid namespace) can tell for sure whether the writer has ended: its pid is gone, a
zombie, or reused by a process that started later. From another host nobody can tell.
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
from datetime import UTC, datetime

from moai_ckpt.format import WriterIdentity

__all__ = ["process_gone", "process_owner", "same_pid_space", "this_writer"]


def _read_text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _proc_stat(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/<pid>/stat (state first), or None where there is no such process."""
    text = _read_text(f"/proc/{pid}/stat")
    return text.rsplit(")", 1)[1].split() if ")" in text else None


def _pid_start(pid: int) -> int | None:
    fields = _proc_stat(pid)
    return int(fields[19]) if fields and len(fields) > 19 and fields[19].isascii() and fields[19].isdigit() else None


def _machine() -> str:
    """This kernel boot and pid namespace: two processes share a pid space iff these match."""
    boot = _read_text("/proc/sys/kernel/random/boot_id")
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return f"{boot}/{namespace}" if boot else ""


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "")
    return int(value) if value.isascii() and value.isdigit() else None


_owner_lock = threading.Lock()
_owner: tuple[int, str] | None = None


def process_owner() -> str:
    """A random id for this process (a fork gets its own)."""
    global _owner
    with _owner_lock:
        if _owner is None or _owner[0] != os.getpid():
            _owner = (os.getpid(), uuid.uuid4().hex)
        return _owner[1]


def this_writer() -> WriterIdentity:
    """The identity this process writes under."""
    pid = os.getpid()
    return WriterIdentity(
        owner=process_owner(),
        host=socket.gethostname()[:255],
        machine=_machine(),
        pid=pid,
        pid_start=_pid_start(pid),
        started=datetime.now(UTC).isoformat(timespec="seconds"),
        job=(os.environ.get("TORCHELASTIC_RUN_ID") or None),
        restart=_env_int("TORCHELASTIC_RESTART_COUNT"),
    )


def same_pid_space(writer: WriterIdentity, me: WriterIdentity) -> bool:
    """Whether ``writer``'s pid means a process this one can see (same host, boot, namespace)."""
    return writer.host == me.host and bool(writer.machine) and writer.machine == me.machine


def process_gone(writer: WriterIdentity, me: WriterIdentity) -> bool | None:
    """Whether ``writer``'s process has ended: True, False, or None where it cannot be seen."""
    if not same_pid_space(writer, me):
        return None
    try:
        os.kill(writer.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's
    fields = _proc_stat(writer.pid)
    if fields is None:
        return True
    if fields[0] in ("Z", "X"):
        return True  # killed, not yet reaped: it writes nothing more
    start = _pid_start(writer.pid)
    return writer.pid_start is not None and start is not None and start != writer.pid_start  # pid reused
