"""Storage keys: the only names moai-ckpt ever writes or reads below a run directory.

A key is a ``/``-separated relative path whose segments use a small safe alphabet. Anything else
(``..``, absolute paths, backslashes, control or shell characters, empty segments) is refused
before it reaches storage, whether it came from user state or from a manifest read back.
"""

from __future__ import annotations

import logging
import re
import threading

from moai_ckpt.errors import UnsafeKeyError

log = logging.getLogger("moai_ckpt.keys")

_SEGMENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}$")
_UNSAFE_CHAR = re.compile(r"[^A-Za-z0-9_.\-]")
MAX_KEY_LENGTH = 1024


def check_key(key: str, *, url: str | None = None) -> str:
    """Return ``key`` if it is a safe relative storage key, else raise `UnsafeKeyError`."""
    if not isinstance(key, str) or not key:
        raise UnsafeKeyError(f"storage key must be a non-empty string, got {key!r}", url=url)
    if len(key) > MAX_KEY_LENGTH:
        raise UnsafeKeyError(f"storage key longer than {MAX_KEY_LENGTH} characters", url=url)
    for segment in key.split("/"):
        if segment in ("", ".", "..") or not _SEGMENT.match(segment):
            raise UnsafeKeyError(
                f"unsafe storage key {key!r}: segment {segment!r} is empty, a relative step, "
                "or uses characters outside [A-Za-z0-9_.-]",
                url=url,
                key=key,
            )
    return key


def sanitize_segment(name: str) -> str:
    """Map an arbitrary state name to a readable, safe key segment (not guaranteed unique)."""
    cleaned = _UNSAFE_CHAR.sub("_", name)[:180]
    if not cleaned or cleaned[0] in ".-":
        cleaned = "_" + cleaned
    return cleaned


def is_safe_key(key: str) -> bool:
    """Whether ``key`` passes `check_key` (for listings, which skip what is not ours)."""
    return (
        isinstance(key, str)
        and 0 < len(key) <= MAX_KEY_LENGTH
        and all(seg not in (".", "..") and _SEGMENT.match(seg) for seg in key.split("/"))
    )


_warned: set[tuple[str, str]] = set()
_MAX_WARNED = 10_000  # a directory of a million stray names must not grow the set forever
_warned_lock = threading.Lock()


def warn_once(where: str, name: str, why: str) -> None:
    """Log one warning per process for a stray name (listings repeat; the log should not)."""
    with _warned_lock:
        if (where, name) in _warned or len(_warned) >= _MAX_WARNED:
            return
        _warned.add((where, name))
    log.warning("ignoring %r in %s: %s", name, where, why)
