"""How storage calls are retried: the policy, which faults are transient, and the retry loop.

`Storage` runs every public call through `call_with_retries`: the first try pays for nothing,
a transient fault (`is_transient`) is retried with jittered exponential backoff under a
`RetryPolicy` (bounded attempts and a deadline, tenacity doing the loop), and a call that fails
for good becomes a `StorageError` naming the operation, URL and key. Retry jitter draws from a
generator of its own: a retried storage call never moves the training job's random streams.
"""

from __future__ import annotations

import errno
import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

import tenacity
from pydantic import BaseModel, ConfigDict, Field

from moai_ckpt.errors import MoaiCkptError, StorageError, TransientStorageError, redact_url

log = logging.getLogger("moai_ckpt.storage")

T = TypeVar("T")


class RetryPolicy(BaseModel):
    """How transient storage faults are retried: bounded attempts, jittered backoff, a deadline."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    attempts: int = Field(default=6, ge=1, le=100, description="total tries per operation")
    initial_backoff_s: float = Field(default=0.05, gt=0, description="first wait before a retry")
    max_backoff_s: float = Field(default=5.0, gt=0, description="cap on one wait")
    deadline_s: float = Field(default=120.0, gt=0, description="give up once this long has passed")
    jitter_s: float = Field(default=0.05, ge=0, description="random extra wait, spreads retrying ranks")


_PERMANENT_ERRNOS = {
    errno.ENOENT,
    errno.EACCES,
    errno.EPERM,
    errno.ENOSPC,
    errno.EROFS,
    errno.EDQUOT,
    errno.ENAMETOOLONG,
    errno.EINVAL,
    errno.EISDIR,
    errno.ENOTDIR,
    errno.EEXIST,
}
_TRANSIENT_TYPE_NAMES = {
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ConnectionClosedError",
    "ServerDisconnectedError",
    "ClientPayloadError",
    "ResponseStreamingError",
    "IncompleteReadError",
}
_TRANSIENT_MESSAGES = ("SlowDown", "Throttl", "RequestTimeout", "InternalError", "ServiceUnavailable", "503")

#: errors the retry loop hands through untouched: ours, and the answers a caller acts on
PASS_THROUGH = (MoaiCkptError, FileNotFoundError, FileExistsError)


def is_transient(exc: BaseException) -> bool:
    """Classify a storage exception: ``True`` means retrying may help."""
    if isinstance(exc, TransientStorageError):
        return True
    if isinstance(exc, MoaiCkptError):
        return False
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return True
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(exc, (FileExistsError, ValueError, TypeError, NotImplementedError, KeyError)):
        return False
    if type(exc).__name__ in _TRANSIENT_TYPE_NAMES:
        return True
    if isinstance(exc, OSError):
        if exc.errno in _PERMANENT_ERRNOS:
            return False
        if exc.errno is None and not any(m in str(exc) for m in _TRANSIENT_MESSAGES):
            # fsspec back ends raise bare OSError for both kinds; unknown faults get retried
            return True
        return True
    return False


# Retry jitter draws from a generator of its own: a retried storage call must never move the
# training job's global random streams (tenacity's wait_random uses the `random` module's).
_JITTER = random.Random()


class _jitter(tenacity.wait.wait_base):
    def __init__(self, upper: float) -> None:
        self.upper = upper

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        return _JITTER.uniform(0, self.upper)


def call_with_retries(fn: Callable[[], T], *, policy: RetryPolicy, op: str, url: str, key: str) -> T:
    """``fn()`` under ``policy``; a fault that is not transient, or outlasts the policy, becomes a
    `StorageError` (`TransientStorageError` when retries ran out) naming ``op``, ``url`` and ``key``.

    Errors in `PASS_THROUGH` (moai-ckpt's own, a missing or existing object) pass untouched.
    """
    started = time.monotonic()
    try:
        return fn()  # the common case pays for no retry machinery
    except PASS_THROUGH:
        raise
    except Exception as exc:
        if not is_transient(exc) or policy.attempts <= 1:
            raise failure(op, url, key, exc, policy) from exc
        _warn(op, url, key, 1, policy.attempts, exc)

    def before_sleep(state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        _warn(op, url, key, state.attempt_number + 1, policy.attempts, exc)

    first_wait = policy.initial_backoff_s + _JITTER.uniform(0, policy.jitter_s)
    left = policy.deadline_s - (time.monotonic() - started) - first_wait
    time.sleep(first_wait)
    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(policy.attempts - 1) | tenacity.stop_after_delay(max(left, 0.0)),
        wait=tenacity.wait_exponential(multiplier=2 * policy.initial_backoff_s, max=policy.max_backoff_s)
        + _jitter(policy.jitter_s),
        retry=tenacity.retry_if_exception(is_transient),
        before_sleep=before_sleep,
        reraise=True,
    )
    try:
        return retrying(fn)
    except PASS_THROUGH:
        raise
    except Exception as exc:
        raise failure(op, url, key, exc, policy) from exc


def _warn(op: str, url: str, key: str, attempt: int, attempts: int, exc: BaseException | None) -> None:
    log.warning(
        "storage %s of %s/%s failed (attempt %d/%d), retrying: %s",
        op,
        redact_url(url),
        key,
        attempt,
        attempts,
        redact_url(str(exc)),
    )


def failure(op: str, url: str, key: str, exc: Exception, policy: RetryPolicy) -> StorageError:
    """The error a caller sees once ``op`` failed for good."""
    transient = is_transient(exc)
    kind = TransientStorageError if transient else StorageError
    hint = (
        f"gave up after {policy.attempts} attempts or {policy.deadline_s:g} s"
        if transient
        else "permanent error, not retried"
    )
    return kind(f"storage {op} failed ({hint}): {type(exc).__name__}: {exc}", url=url, key=key or None)
