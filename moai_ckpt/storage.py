"""The one storage layer: every byte moai-ckpt moves goes through `Storage`.

Public methods own the invariants (key safety, retries with backoff and a deadline, error
classification, naming the URL and operation on failure); the ``_``-prefixed hooks do the I/O.
Two back ends: `LocalStorage` (plain paths: zero-copy vectored I/O and fsync, never following a
link) and `FsspecStorage` (any fsspec URL: ``memory://``, ``s3://``, ``gs://``, wrappers). Nothing
relies on rename or append, which object stores lack; writer fencing relies on `Storage.create`,
an exclusive create (``O_EXCL``, a conditional PUT) where the back end has one.

Storage is untrusted: metadata reads are bounded (`Storage.read_record`), links and special
files are refused, and names outside the key alphabet are skipped by listings and deleted by
`Storage.delete_tree` without being parsed.

Paths stay ``str`` end to end: a ``pathlib.Path`` would collapse the ``//`` in ``s3://``.
"""

from __future__ import annotations

import builtins
import contextlib
import ctypes
import errno
import functools
import logging
import os
import random
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import TypeVar, cast

import fsspec
import tenacity
from fsspec.implementations.chained import ChainedFileSystem
from fsspec.implementations.local import LocalFileSystem
from fsspec.spec import AbstractFileSystem
from pydantic import BaseModel, ConfigDict, Field

from moai_ckpt import nofollow
from moai_ckpt.errors import (
    MoaiCkptError,
    ObjectTooLargeError,
    StorageError,
    TransientStorageError,
    TruncatedDataError,
    UnsafeEntryError,
    redact_url,
)
from moai_ckpt.keys import check_key, is_safe_key, warn_once
from moai_ckpt.nofollow import NoFollowTree

log = logging.getLogger("moai_ckpt.storage")

T = TypeVar("T")
Buffer = bytes | bytearray | memoryview


class RetryPolicy(BaseModel):
    """How transient storage faults are retried: bounded attempts, jittered backoff, a deadline."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    attempts: int = Field(default=6, ge=1, le=100, description="total tries per operation")
    initial_backoff_s: float = Field(default=0.05, gt=0, description="first wait before a retry")
    max_backoff_s: float = Field(default=5.0, gt=0, description="cap on one wait")
    deadline_s: float = Field(default=120.0, gt=0, description="give up once this long has passed")
    jitter_s: float = Field(default=0.05, ge=0, description="random extra wait, spreads retrying ranks")


#: the default bound on one metadata object (`Storage.read_record`)
DEFAULT_OBJECT_LIMIT = 4 << 30
DEFAULT_RECORD_LIMIT = 64 << 20

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


class Storage:
    """A run directory on some storage, addressed by safe relative keys.

    Args:
        url: the run directory (a plain path or any fsspec URL).
        retry: how transient faults are retried.
    """

    #: whether a `barrier` makes earlier writes durable (False: a scratch disk, no fsync)
    durable: bool = True
    #: whether `create` is atomic against other processes (``O_EXCL``, a conditional PUT). Where
    #: it is not, `create` checks, writes and reads back: two writers racing for one key may both
    #: believe they won, so fencing between writers is only as strong as that (docs/security.md)
    supports_exclusive_create: bool = True
    #: the largest object `read_record` reads (`CheckpointerOptions.max_record_bytes` sets it)
    record_limit: int = DEFAULT_RECORD_LIMIT
    #: the largest object `read` returns whole (chunks are read into their tensors, sized by the manifest)
    object_limit: int = DEFAULT_OBJECT_LIMIT

    def __init__(self, url: str, retry: RetryPolicy | None = None) -> None:
        self.url = url.rstrip("/") if url not in ("/",) else url
        self.retry = retry or RetryPolicy()

    # -- public surface: checked and retried -------------------------------------------------

    def write(self, key: str, data: Buffer | Sequence[Buffer]) -> None:
        """Write a whole object (replacing any previous one); ``data`` may be several buffers."""
        parts = [data] if isinstance(data, (bytes, bytearray, memoryview)) else list(data)
        self._call("write", key, lambda: self._write(key, parts))

    def create(self, key: str, data: bytes) -> None:
        """Write a new object at ``key``, never replacing one: `FileExistsError` if one is there.

        Atomic where `supports_exclusive_create` is set. A retry whose earlier attempt landed
        after all is recognised by the content it finds, so a transient fault is no false refusal.
        """
        payload = bytes(data)
        tries = 0

        def attempt() -> None:
            nonlocal tries
            tries += 1
            try:
                self._create(key, payload)
            except FileExistsError:
                if tries > 1 and self._stored_equals(key, payload):
                    return
                raise

        self._call("create", key, attempt)

    def read(self, key: str, limit: int | None = None) -> bytes:
        """Read a whole object (a regular one: links and special files are refused), bounded too.

        Raises:
            ObjectTooLargeError: the object is larger than ``limit`` (default `object_limit`).
        """
        bound = self.object_limit if limit is None else limit
        return self._call("read", key, lambda: self._read_record(key, bound))

    def read_record(self, key: str, limit: int | None = None) -> bytes:
        """Read a small metadata object (a JSON record, a marker), bounded before it is read.

        Raises:
            ObjectTooLargeError: the object is larger than ``limit`` (default `record_limit`).
            UnsafeEntryError: the entry is a link or special file (a FIFO never blocks the read).
        """
        bound = self.record_limit if limit is None else limit
        return self._call("read", key, lambda: self._read_record(key, bound))

    def read_into(self, key: str, parts: Sequence[memoryview]) -> None:
        """Fill ``parts`` from the object, which must be exactly as long as they are together."""
        self._call("read", key, lambda: self._read_into(key, parts))

    def size(self, key: str) -> int:
        """Size of an object in bytes; `FileNotFoundError` if it does not exist."""
        return self._call("size", key, lambda: self._size(key))

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except FileNotFoundError:
            return False
        return True

    def list(self, prefix: str = "") -> list[str]:
        """All object keys below ``prefix`` (recursive), sorted, relative to the run directory.

        Only objects that a key can name are listed: links, special files and names outside the
        key alphabet (``.nfs…`` files, non-UTF-8 names) are skipped with a warning (once).
        """
        if prefix:
            check_key(prefix, url=self.url)
        found = self._call("list", prefix, lambda: self._list(prefix))
        keys = []
        for key in found:
            if is_safe_key(key):
                keys.append(key)
            else:
                warn_once(self.url, key, "not a valid storage key")
        return sorted(keys)

    def list_dirs(self, prefix: str = "") -> builtins.list[str]:
        """Names of the immediate sub-directories (or common prefixes) of ``prefix``.

        Links are not directories; names outside the key alphabet are skipped with a warning.
        """
        if prefix:
            check_key(prefix, url=self.url)
        names = []
        for name in self._call("list", prefix, lambda: self._list_dirs(prefix)):
            if is_safe_key(name) and "/" not in name:
                names.append(name)
            else:
                warn_once(f"{self.url}/{prefix}".rstrip("/"), name, "not a valid storage key")
        return sorted(names)

    def delete(self, keys: Iterable[str]) -> None:
        """Delete objects; missing ones are ignored."""
        keys = [check_key(k, url=self.url) for k in keys]
        if keys:
            self._call("delete", keys[0], lambda: self._delete(keys))

    def delete_tree(self, prefix: str, *, first: Iterable[str] = (), keep: Iterable[str] = ()) -> None:
        """Delete everything below ``prefix``, whatever the names and kinds of the entries.

        Names are not checked against the key alphabet (an ``.nfs…`` file or a non-UTF-8 name
        is deleted like any other) and links are removed, never followed. Everything is listed
        and checked first (nothing below may lead outside ``prefix``), then the keys in
        ``first`` are deleted (a marker that vouches for the rest: un-commit before deleting),
        then everything else except ``keep``.
        """
        check_key(prefix, url=self.url)
        firsts = [check_key(k, url=self.url) for k in first]
        kept = {check_key(k, url=self.url) for k in keep}
        self._call("delete", prefix, lambda: self._delete_tree(prefix, firsts, kept))

    def delete_prefix(self, prefix: str) -> None:
        """Delete everything below ``prefix`` (see `delete_tree`)."""
        self.delete_tree(prefix)

    def newest_change(self, prefix: str) -> float | None:
        """Unix time of the newest change below ``prefix``, or None where the back end cannot tell."""
        check_key(prefix, url=self.url)
        return self._call("list", prefix, lambda: self._newest_change(prefix))

    def write_durable(self, key: str, data: Buffer | Sequence[Buffer]) -> None:
        """`write` then `barrier` for one object (a local disk fsyncs it before closing it)."""
        parts = [data] if isinstance(data, (bytes, bytearray, memoryview)) else list(data)
        self._call("write", key, lambda: self._write(key, parts, sync=True))
        self.barrier([key])

    def barrier(self, keys: Iterable[str]) -> None:
        """Make the objects at ``keys`` and their directory entries durable.

        Object stores make a write durable when it returns, so there it is a no-op; local disks
        flush here. Call it before anything that vouches for those objects (a commit marker).
        """
        keys = [check_key(k, url=self.url) for k in keys]
        self._call("sync", keys[0] if keys else "", lambda: self._barrier(keys))

    def _call(self, op: str, key: str, fn: Callable[[], T]) -> T:
        if key:
            check_key(key, url=self.url)
        policy = self.retry
        started = time.monotonic()
        try:
            return fn()  # the common case pays for no retry machinery
        except _PASS_THROUGH:
            raise
        except Exception as exc:
            if not is_transient(exc) or policy.attempts <= 1:
                raise self._failure(op, key, exc) from exc
            log.warning(
                "storage %s of %s/%s failed (attempt 1/%d), retrying: %s",
                op,
                redact_url(self.url),
                key,
                policy.attempts,
                redact_url(str(exc)),
            )

        def before_sleep(state: tenacity.RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            log.warning(
                "storage %s of %s/%s failed (attempt %d/%d), retrying: %s",
                op,
                redact_url(self.url),
                key,
                state.attempt_number + 1,
                policy.attempts,
                redact_url(str(exc)),
            )

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
        except _PASS_THROUGH:
            raise
        except Exception as exc:
            raise self._failure(op, key, exc) from exc

    def _failure(self, op: str, key: str, exc: Exception) -> StorageError:
        """The error a caller sees once ``op`` failed for good."""
        policy = self.retry
        transient = is_transient(exc)
        kind = TransientStorageError if transient else StorageError
        hint = (
            f"gave up after {policy.attempts} attempts or {policy.deadline_s:g} s"
            if transient
            else "permanent error, not retried"
        )
        return kind(f"storage {op} failed ({hint}): {type(exc).__name__}: {exc}", url=self.url, key=key or None)

    def _refused(self, key: str, kind: str) -> UnsafeEntryError:
        return UnsafeEntryError(
            f"refusing a {kind} where an object or directory belongs (it is never followed or opened)",
            url=self.url,
            key=key,
        )

    def _too_large(self, key: str, size: int | str, limit: int) -> ObjectTooLargeError:
        return ObjectTooLargeError(
            f"object is {size} bytes, more than the {limit}-byte limit for metadata "
            "(CheckpointerOptions.max_record_bytes); it is not read",
            url=self.url,
            key=key,
        )

    # -- hooks ---------------------------------------------------------------------------------

    def _write(self, key: str, parts: builtins.list[Buffer], sync: bool = False) -> None:
        raise NotImplementedError

    def _create(self, key: str, data: bytes) -> None:
        """Exclusive create. This default is the weak form for back ends without one: check,
        write, read back; a racing writer that wrote in between is noticed only sometimes."""
        try:
            self._size(key)
        except FileNotFoundError:
            pass
        else:
            raise FileExistsError(errno.EEXIST, "an object exists here", key)
        stored: bytes | None = b""
        for _ in range(_TORN_REWRITES):
            with contextlib.suppress(_TornWrite):
                self._write(key, [data])
            try:
                stored = self._read_record(key, len(data))
            except ObjectTooLargeError:
                stored = None
            if stored == data:
                return
            if stored is None or not data.startswith(stored):
                raise FileExistsError(errno.EEXIST, "another writer created this object at the same moment", key)
            # a torn prefix of our own bytes: past the check the object is ours, so write it again
        raise TruncatedDataError(
            f"the object reads back {len(stored or b'')} of the {len(data)} bytes written, "
            f"{_TORN_REWRITES} times (torn writes)",
            url=self.url,
            key=key,
        )

    def _stored_equals(self, key: str, data: bytes) -> bool:
        """Whether the object at ``key`` holds exactly ``data`` (read no more than that)."""
        try:
            return self._read_record(key, len(data)) == data
        except (FileNotFoundError, ObjectTooLargeError):
            return False

    def _read(self, key: str) -> bytes:
        raise NotImplementedError

    def _read_record(self, key: str, limit: int) -> bytes:
        size = self._size(key)
        if size > limit:
            raise self._too_large(key, size, limit)
        data = self._read(key)
        if len(data) > limit:  # grew in between
            raise self._too_large(key, len(data), limit)
        return data

    def _read_into(self, key: str, parts: Sequence[memoryview]) -> None:
        data = self._read(key)
        expected = sum(p.nbytes for p in parts)
        if len(data) != expected:
            raise TruncatedDataError(f"object is {len(data)} bytes, expected {expected}", url=self.url, key=key)
        offset = 0
        for p in parts:
            p.cast("B")[:] = data[offset : offset + p.nbytes]
            offset += p.nbytes

    def _size(self, key: str) -> int:
        raise NotImplementedError

    def _list(self, prefix: str) -> builtins.list[str]:
        raise NotImplementedError

    def _list_dirs(self, prefix: str) -> builtins.list[str]:
        raise NotImplementedError

    def _delete(self, keys: builtins.list[str]) -> None:
        raise NotImplementedError

    def _delete_tree(self, prefix: str, first: builtins.list[str], keep: set[str]) -> None:
        raise NotImplementedError

    def _newest_change(self, prefix: str) -> float | None:
        return None

    def _barrier(self, keys: builtins.list[str]) -> None:
        """Durability barrier for earlier writes (object stores: nothing to do)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


# errors the retry loop hands through untouched: ours, and the answers a caller acts on
_PASS_THROUGH = (MoaiCkptError, FileNotFoundError, FileExistsError)


def _as_bytes(view: Buffer) -> memoryview:
    return memoryview(view).cast("B") if isinstance(view, memoryview) else memoryview(view)


class LocalStorage(Storage):
    """A directory on a local (or mounted) file system: vectored I/O straight from tensor memory.

    Every key is reached through `NoFollowTree`: one ``openat`` per segment with ``O_NOFOLLOW``,
    so no link below the run directory is ever followed and a FIFO or device is refused before it
    is read. An object with other hard links is replaced, not written through.

    Durability: with ``fsync=True`` (the default) every object written is on disk once a `barrier`
    covering it returns. On Linux that barrier is one ``syncfs(2)`` of the file system; elsewhere
    each file is fsync'ed as it is written and the barrier fsyncs the directories.
    """

    def __init__(self, path: str, retry: RetryPolicy | None = None, *, fsync: bool = True) -> None:
        path = os.path.abspath(os.path.expanduser(path.removeprefix("file://")))
        super().__init__(path, retry)
        self.root = path
        self.durable = fsync
        self.tree = NoFollowTree(path, self._refused)
        self._durable_chains: set[str] = set()  # directories whose whole chain up to root was fsync'ed
        self._synced_files: set[str] = set()  # written with their fsync (write_durable); the barrier skips them
        self._lock = threading.Lock()

    def _path(self, key: str) -> str:
        return os.path.join(self.root, key) if key else self.root

    def _write(self, key: str, parts: list[Buffer], sync: bool = False) -> None:
        fd, st = self.tree.open(key, nofollow.WRITE_FLAGS, create_dirs=True)
        if st.st_nlink > 1:
            # a hard link shares its bytes with a name elsewhere (maybe outside the run): writing
            # through it would change that file too, so the name gets a file of its own
            os.close(fd)
            self.tree.unlink(key)
            fd, st = self.tree.open(key, nofollow.CREATE_FLAGS, create_dirs=True)
        try:
            if st.st_size:
                os.ftruncate(fd, 0)
            self._write_fd(fd, parts)
            if self.durable and (sync or _SYNCFS is None):
                os.fsync(fd)
                if sync:
                    with self._lock:
                        self._synced_files.add(key)
        finally:
            os.close(fd)

    @staticmethod
    def _write_fd(fd: int, parts: list[Buffer]) -> None:
        views = [_as_bytes(p) for p in parts]
        total = sum(v.nbytes for v in views)
        written = 0
        while written < total:
            written += _writev_from(fd, views, written)

    def _create(self, key: str, data: bytes) -> None:
        fd, _ = self.tree.open(key, nofollow.CREATE_FLAGS, create_dirs=True)  # O_EXCL: FileExistsError
        try:
            self._write_fd(fd, [data])
            if self.durable:
                os.fsync(fd)
                with self._lock:
                    self._synced_files.add(key)
        finally:
            os.close(fd)

    def _open_object(self, key: str) -> tuple[int, os.stat_result]:
        try:
            return self.tree.open(key, nofollow.READ_FLAGS)
        except IsADirectoryError:
            raise _not_an_object(self._path(key)) from None

    def _read(self, key: str) -> bytes:
        fd, st = self._open_object(key)
        try:
            return _read_fd(fd, st.st_size)
        finally:
            os.close(fd)

    def _read_record(self, key: str, limit: int) -> bytes:
        fd, st = self._open_object(key)
        try:
            if st.st_size > limit:
                raise self._too_large(key, st.st_size, limit)
            return _read_fd(fd, st.st_size)
        finally:
            os.close(fd)

    def _read_into(self, key: str, parts: Sequence[memoryview]) -> None:
        fd, st = self._open_object(key)
        try:
            views = [_as_bytes(p) for p in parts]
            expected = sum(v.nbytes for v in views)
            actual = st.st_size
            if actual != expected:
                raise TruncatedDataError(f"object is {actual} bytes, expected {expected}", url=self.url, key=key)
            if expected >= _READAHEAD_MIN and hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)  # a wider readahead window
            done = 0
            while done < expected:
                n = _readv_into(fd, views, done)
                if n == 0:
                    raise TruncatedDataError(f"object ended after {done} of {expected} bytes", url=self.url, key=key)
                done += n
        finally:
            os.close(fd)

    def _size(self, key: str) -> int:
        st = self.tree.lstat(key)
        kind = nofollow.kind_of(st.st_mode)
        if kind == nofollow.DIR:
            raise _not_an_object(self._path(key))
        if kind != nofollow.FILE:
            raise self._refused(key, kind)
        return st.st_size

    def _prefix_kind(self, prefix: str) -> str | None:
        if not prefix:
            return nofollow.DIR
        try:
            return nofollow.kind_of(self.tree.lstat(prefix).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            return None

    def _list(self, prefix: str) -> list[str]:
        kind = self._prefix_kind(prefix)
        if kind == nofollow.FILE:
            return [prefix]
        if kind is None:
            return []
        if kind != nofollow.DIR:
            raise self._refused(prefix, kind)
        head = f"{prefix}/" if prefix else ""
        out = []
        for entry in self.tree.walk(prefix):
            key = head + "/".join(entry.parts)
            if entry.kind == nofollow.FILE:
                out.append(key)
            elif entry.kind != nofollow.DIR:
                warn_once(self.url, key, f"a {entry.kind} is not an object")
        return out

    def _list_dirs(self, prefix: str) -> list[str]:
        try:
            with self.tree.directory(prefix.split("/") if prefix else []) as fd, os.scandir(fd) as it:
                return [e.name for e in it if e.is_dir(follow_symlinks=False)]
        except (FileNotFoundError, NotADirectoryError):
            return []

    def _delete(self, keys: list[str]) -> None:
        for key in keys:
            self.tree.unlink(key)

    def _delete_tree(self, prefix: str, first: list[str], keep: set[str]) -> None:
        self.tree.remove_tree(prefix, first=first, keep=keep)
        with self._lock:
            self._durable_chains = {d for d in self._durable_chains if d != prefix and not d.startswith(prefix + "/")}

    def _newest_change(self, prefix: str) -> float | None:
        try:
            top = self.tree.lstat(prefix).st_mtime
        except (FileNotFoundError, NotADirectoryError):
            return None
        return (
            max([top, *(e.mtime for e in self.tree.walk(prefix))]) if self._prefix_kind(prefix) == "directory" else top
        )

    def _barrier(self, keys: list[str]) -> None:
        if not self.durable:
            return
        if _SYNCFS is not None and len(keys) > _FSYNC_MAX_KEYS:
            # one syncfs(2) flushes every write and directory entry of the file system with a single
            # journal commit; fsync'ing hundreds of files and directories costs one commit each.
            # For a few keys (a log segment) it is the other way round: syncfs would also flush
            # whatever else is dirty on the file system (a snapshot being written, other jobs)
            with self.tree.directory([]) as fd:
                if _SYNCFS(fd) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"syncfs failed: {os.strerror(err)}", self.root)
            return
        if _SYNCFS is not None:  # the writes skipped their fsync, counting on this barrier
            for key in keys:
                with self._lock:
                    if key in self._synced_files:
                        self._synced_files.discard(key)
                        continue
                fd, _ = self._open_object(key)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        # the directory holding each key (its new entry); the chain above it up to the run
        # directory only the first time this process makes something durable there
        dirs: set[str] = set()
        for key in keys:
            d = key.rpartition("/")[0]
            dirs.add(d)
            with self._lock:
                if d in self._durable_chains:
                    continue
                self._durable_chains.add(d)
            while d:
                d = d.rpartition("/")[0]
                dirs.add(d)
        for d in sorted(dirs, key=len, reverse=True):
            with self.tree.directory(d.split("/") if d else []) as fd:
                os.fsync(fd)


def _read_fd(fd: int, size: int) -> bytes:
    """Read up to ``size`` bytes (what fstat said; a file that grew since is read no further)."""
    chunks = []
    left = size
    while left > 0:
        data = os.read(fd, left)
        if not data:
            break
        chunks.append(data)
        left -= len(data)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _not_an_object(path: str) -> FileNotFoundError:
    # a key names an object; a directory (a prefix with objects below) is not one, as on S3
    return FileNotFoundError(errno.ENOENT, "no object here (it is a directory)", path)


def _slice_views(views: list[memoryview], offset: int) -> list[memoryview]:
    out = []
    for v in views:
        if offset >= v.nbytes:
            offset -= v.nbytes
            continue
        out.append(v[offset:])
        offset = 0
    return out


_IOV_MAX = 512


def _load_syncfs() -> Callable[[int], int] | None:
    """Linux's syncfs(2), when the C library has it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return cast(Callable[[int], int], fn)


_SYNCFS = _load_syncfs()
_ATOMIC_PUT_PROTOCOLS = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "memory", "oss", "r2"}
#: back ends whose ``pipe_file(mode="create")`` is an atomic exclusive create: s3fs sends
#: ``If-None-Match: *`` (AWS S3 and the moto server honour it); memory opens with ``xb``
_NATIVE_CREATE_PROTOCOLS = {"s3", "s3a", "memory"}


class _TornWrite(ConnectionError):
    """A write the storage reported as done left fewer bytes than were written (retried)."""


_TORN_REWRITES = 4  # an emulated exclusive create rewrites its own torn object this often

# Retry jitter draws from a generator of its own: a retried storage call must never move the
# training job's global random streams (tenacity's wait_random uses the `random` module's).
_JITTER = random.Random()


class _jitter(tenacity.wait.wait_base):
    def __init__(self, upper: float) -> None:
        self.upper = upper

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        return _JITTER.uniform(0, self.upper)


_FSYNC_MAX_KEYS = 8  # barriers over more keys than this use one syncfs
_READAHEAD_MIN = 1 << 20


def _writev_from(fd: int, views: list[memoryview], offset: int) -> int:
    return os.writev(fd, _slice_views(views, offset)[:_IOV_MAX])


def _readv_into(fd: int, views: list[memoryview], offset: int) -> int:
    return os.readv(fd, _slice_views(views, offset)[:_IOV_MAX])


class FsspecStorage(Storage):
    """Any fsspec file system: object stores, memory, wrappers. Writes whole objects only.

    On a local file system behind fsspec every path is checked with ``realpath`` (and ``lstat``)
    before it is used: a link below the run directory, or a special file, is refused. That check
    and the use are two steps; `LocalStorage`, which never follows a link at all, is the one to
    use where other users can write the run directory.

    Exclusive create (`create`) is a conditional PUT (``If-None-Match: *``) on S3, ``O_EXCL`` on
    a bare local file system, the memory file system's own ``xb``; anywhere else it falls back to
    check, write, read back, with a warning (`supports_exclusive_create` is False).
    """

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, url: str, retry: RetryPolicy | None = None) -> None:
        super().__init__(url, retry)
        self.fs = fs
        # Object stores put an object whole or not at all; elsewhere (network and FUSE file
        # systems, wrappers) a write may report success and keep a prefix: read its size back
        protocols = fs.protocol if isinstance(fs.protocol, tuple | list) else (fs.protocol,)
        self.verify_writes = not set(protocols) & _ATOMIC_PUT_PROTOCOLS
        # the file system's own spelling of the root (absolute for a local path, even when a
        # wrapper's URL held a relative one), so the paths it returns can be made relative
        self.root = fs._strip_protocol(root).rstrip("/")
        layers = _layers(fs)
        inner = layers[-1]
        local = isinstance(inner, LocalFileSystem)
        #: the run directory with every link resolved, for the realpath checks (local file systems)
        self.real_root: str | None = os.path.realpath(self.root) if local else None
        if local and len(layers) == 1:
            self._create_mode = "local"  # O_EXCL through our own no-follow walker
        elif _protocols(inner) & _NATIVE_CREATE_PROTOCOLS and all(
            getattr(layer, "forwards_create_mode", False) for layer in layers[:-1]
        ):
            self._create_mode = "native"
        else:
            self._create_mode = "emulated"
        self.supports_exclusive_create = self._create_mode != "emulated"
        self._fs_name = type(inner).__name__

    def _path(self, key: str) -> str:
        return f"{self.root}/{key}" if key else self.root

    def _rel(self, path: str) -> str:
        path = path.rstrip("/")
        root = self.root.lstrip("/")
        stripped = path.lstrip("/")
        return stripped[len(root) :].lstrip("/") if stripped.startswith(root) else stripped

    # -- local file systems: no link below the root, no special files ----------------------------

    def _guard(self, key: str, *, leaf: bool = True) -> None:
        """On a local file system, refuse a key whose path crosses a link (or is a special file).

        With ``leaf=False`` only the directories above the key are checked (deleting a link
        removes the link itself).
        """
        if self.real_root is None or not key:
            return
        parent = key.rpartition("/")[0]
        checked = key if leaf else parent
        if checked:
            expected = os.path.join(self.real_root, *checked.split("/"))
            if os.path.realpath(self._path(checked)) != expected:
                raise self._refused(self._first_link(checked), "symbolic link")
        if leaf:
            try:
                kind = nofollow.kind_of(os.lstat(self._path(key)).st_mode)
            except (FileNotFoundError, NotADirectoryError):
                return
            if kind not in (nofollow.FILE, nofollow.DIR):
                raise self._refused(key, kind)

    def _first_link(self, key: str) -> str:
        parts = key.split("/")
        for i in range(1, len(parts) + 1):
            with contextlib.suppress(OSError):
                if os.path.islink(self._path("/".join(parts[:i]))):
                    return "/".join(parts[:i])
        return key

    # -- hooks ------------------------------------------------------------------------------------

    def _write(self, key: str, parts: list[Buffer], sync: bool = False) -> None:
        self._guard(key)
        if self.real_root is not None:
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                if os.lstat(self._path(key)).st_nlink > 1:
                    os.unlink(self._path(key))  # never write through a hard link (see LocalStorage)
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        self.fs.pipe_file(self._path(key), bytes(data) if isinstance(data, memoryview) else data)
        self._check_written(key, data)

    def _check_written(self, key: str, data: Buffer) -> None:
        if self.verify_writes:
            size = data.nbytes if isinstance(data, memoryview) else len(data)
            stored = self._size(key)
            if stored != size:  # raised inside the retried call: the write is made again
                raise _TornWrite(f"a write of {size} bytes left {stored} bytes (torn)")

    def _create(self, key: str, data: bytes) -> None:
        if self._create_mode == "emulated":
            _warn_emulated_create(self.url, self._fs_name)
            super()._create(key, data)
            return
        if self._create_mode == "local":
            self._guard(key, leaf=False)
            tree = NoFollowTree(self.root, self._refused)
            fd, _ = tree.open(key, nofollow.CREATE_FLAGS, create_dirs=True)
            try:
                LocalStorage._write_fd(fd, [data])
            finally:
                os.close(fd)
            return
        self.fs.pipe_file(self._path(key), data, mode="create")  # If-None-Match: * on S3
        self._check_written(key, data)

    def _read(self, key: str) -> bytes:
        self._guard(key)
        try:
            return bytes(self.fs.cat_file(self._path(key)))
        except IsADirectoryError:
            raise _not_an_object(self._path(key)) from None

    def _read_record(self, key: str, limit: int) -> bytes:
        # a local file system: no link on the way, and a regular file (a FIFO never blocks)
        self._guard(key)
        # one ranged read of at most one byte past the limit: never the whole of a huge object
        try:
            data = bytes(self.fs.cat_file(self._path(key), start=0, end=limit + 1))
        except IsADirectoryError:
            raise _not_an_object(self._path(key)) from None
        except OSError as exc:
            # S3 answers a range on an empty object with 416 (EINVAL): read its size instead
            if exc.errno != errno.EINVAL or self._size(key) != 0:
                raise
            return b""
        if len(data) > limit:
            raise self._too_large(key, f"more than {limit}", limit)
        return data

    def _size(self, key: str) -> int:
        self._guard(key)
        info = self.fs.info(self._path(key))
        if info.get("type") == "directory":
            raise FileNotFoundError(self._path(key))
        if self.real_root is not None and info.get("type") != "file":
            raise self._refused(key, nofollow.OTHER)
        return int(info["size"])

    def _find(self, prefix: str) -> dict[str, dict[str, object]]:
        """Everything below ``prefix`` (files, links, special files; no directories), by path."""
        try:
            found = self.fs.find(self._path(prefix), detail=True)
        except FileNotFoundError:
            return {}
        return dict(found) if isinstance(found, dict) else {p: {"type": "file"} for p in found}

    def _list(self, prefix: str) -> list[str]:
        self._guard(prefix)
        out = []
        for path, info in self._find(prefix).items():
            key = self._rel(path)
            if info.get("type", "file") == "file":
                out.append(key)
            else:
                warn_once(self.url, key, f"a {info.get('type')} entry is not an object")
        return out

    def _list_dirs(self, prefix: str) -> list[str]:
        self._guard(prefix)
        try:
            entries = self.fs.ls(self._path(prefix), detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return [e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "directory"]

    def _delete(self, keys: list[str]) -> None:
        for key in keys:
            self._guard(key, leaf=False)
        paths = [self._path(k) for k in keys]
        self._rm(paths)

    def _rm(self, paths: list[str]) -> None:
        if not paths:
            return
        try:
            self.fs.rm(paths)
        except FileNotFoundError:
            for p in paths:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm_file(p)

    def _delete_tree(self, prefix: str, first: list[str], keep: set[str]) -> None:
        self._guard(prefix, leaf=False)
        path = self._path(prefix)
        if self.real_root is not None and os.path.lexists(path) and (os.path.islink(path) or not os.path.isdir(path)):
            if prefix not in keep:
                self._rm([path])  # a link (or file) where the directory was: the entry itself goes
            return
        found = self._find(prefix)
        inside = path.rstrip("/") + "/"
        for p in found:  # find never leaves the prefix; checked anyway before anything is deleted
            if not p.lstrip("/").startswith(inside.lstrip("/")):
                raise self._refused(self._rel(p), "path outside the directory being deleted")
        keys = {self._rel(p): p for p in found}
        self._rm([keys[k] for k in first if k in keys and k not in keep])
        self._rm([p for k, p in keys.items() if k not in keep and k not in first])
        if not keep:
            try:
                if self.fs.isdir(path):
                    self.fs.rm(path, recursive=True)
            except (FileNotFoundError, NotImplementedError):
                pass
        self.fs.invalidate_cache()

    def _newest_change(self, prefix: str) -> float | None:
        times = [_timestamp(info) for info in self._find(prefix).values()]
        known = [t for t in times if t is not None]
        return max(known) if known else None


def _layers(fs: fsspec.AbstractFileSystem) -> list[fsspec.AbstractFileSystem]:
    """``fs`` and the file systems it wraps, outermost first."""
    layers = [fs]
    while isinstance(layers[-1], ChainedFileSystem) and isinstance(getattr(layers[-1], "fs", None), AbstractFileSystem):
        layers.append(layers[-1].fs)
    return layers


def _protocols(fs: fsspec.AbstractFileSystem) -> set[str]:
    return set(fs.protocol) if isinstance(fs.protocol, tuple | list) else {fs.protocol}


def _timestamp(info: dict[str, object]) -> float | None:
    """When an fsspec entry last changed, from whichever field its back end fills."""
    for field in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(field)
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return None


@functools.lru_cache(maxsize=64)
def _warn_emulated_create(url: str, fs_name: str) -> None:
    """Say once per run directory, when a writer first relies on it, that fencing is weaker here."""
    log.warning(
        "storage %s cannot create an object exclusively (no O_EXCL or conditional PUT known for %s): "
        "writer fencing falls back to write-and-read-back, which two writers racing for the same key "
        "can both pass (see docs/security.md)",
        redact_url(url),
        fs_name,
    )


def open_storage(
    url: str,
    retry: RetryPolicy | None = None,
    **storage_options: object,
) -> Storage:
    """Open a run directory from a path or fsspec URL.

    A bare path (or ``file://``) gives `LocalStorage`; pass ``fsync=False`` to skip fsync on
    scratch disks. Other URLs go to fsspec with ``storage_options`` (for example
    ``endpoint_url`` for ``s3://``).
    """
    # a chained URL (``faulty::/data/run``, ``simplecache::s3://b/run``) is its outermost protocol's
    head = url.split("::", 1)[0]
    protocol = head.split("://", 1)[0] if "://" in head else ("file" if head == url else head)
    if protocol == "file" and set(storage_options) <= {"fsync"}:
        return LocalStorage(url, retry, fsync=bool(storage_options.get("fsync", True)))
    if protocol == "faulty":  # registered by an entry point once installed; not when run from a checkout
        import moai_ckpt.testing.faulty  # noqa: F401
    try:
        fs, root = fsspec.core.url_to_fs(url, **storage_options)
    except ImportError as exc:
        raise StorageError(f"no fsspec back end for {protocol}://: {exc}", url=url) from exc
    except ValueError as exc:
        raise StorageError(f"cannot open storage: {exc}", url=url) from exc
    if protocol == "file":
        fs = fsspec.filesystem("file", auto_mkdir=True)
    return FsspecStorage(fs, root, url, retry)
