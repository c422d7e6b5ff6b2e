"""The one storage layer: every byte moai-ckpt moves goes through `Storage`.

Public methods own the invariants (key safety, retries with backoff and a deadline, error
classification, naming the URL and operation on failure); the ``_``-prefixed hooks do the I/O.
Two back ends: `LocalStorage` (plain paths: zero-copy vectored I/O and fsync) and
`FsspecStorage` (any fsspec URL: ``memory://``, ``s3://``, ``gs://``, wrappers). Nothing relies on
rename or append, which object stores lack.

Paths stay ``str`` end to end: a ``pathlib.Path`` would collapse the ``//`` in ``s3://``.
"""

from __future__ import annotations

import builtins
import contextlib
import ctypes
import errno
import logging
import os
import random
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar, cast

import fsspec
import tenacity
from pydantic import BaseModel, ConfigDict, Field

from moai_ckpt.errors import (
    MoaiCkptError,
    StorageError,
    TransientStorageError,
    TruncatedDataError,
    redact_url,
)
from moai_ckpt.keys import check_key

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

    def __init__(self, url: str, retry: RetryPolicy | None = None) -> None:
        self.url = url.rstrip("/") if url not in ("/",) else url
        self.retry = retry or RetryPolicy()

    # -- public surface: checked and retried -------------------------------------------------

    def write(self, key: str, data: Buffer | Sequence[Buffer]) -> None:
        """Write a whole object (replacing any previous one); ``data`` may be several buffers."""
        parts = [data] if isinstance(data, (bytes, bytearray, memoryview)) else list(data)
        self._call("write", key, lambda: self._write(key, parts))

    def read(self, key: str) -> bytes:
        """Read a whole object."""
        return self._call("read", key, lambda: self._read(key))

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
        """All object keys below ``prefix`` (recursive), sorted, relative to the run directory."""
        if prefix:
            check_key(prefix, url=self.url)
        return sorted(self._call("list", prefix, lambda: self._list(prefix)))

    def list_dirs(self, prefix: str = "") -> builtins.list[str]:
        """Names of the immediate sub-directories (or common prefixes) of ``prefix``."""
        if prefix:
            check_key(prefix, url=self.url)
        return sorted(self._call("list", prefix, lambda: self._list_dirs(prefix)))

    def delete(self, keys: Iterable[str]) -> None:
        """Delete objects; missing ones are ignored."""
        keys = [check_key(k, url=self.url) for k in keys]
        if keys:
            self._call("delete", keys[0], lambda: self._delete(keys))

    def delete_prefix(self, prefix: str) -> None:
        """Delete everything below ``prefix``."""
        self.delete(self.list(prefix))
        self._call("delete", prefix, lambda: self._cleanup_dirs(prefix))

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
        except (MoaiCkptError, FileNotFoundError):
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
        except (MoaiCkptError, FileNotFoundError):
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

    # -- hooks ---------------------------------------------------------------------------------

    def _write(self, key: str, parts: builtins.list[Buffer], sync: bool = False) -> None:
        raise NotImplementedError

    def _read(self, key: str) -> bytes:
        raise NotImplementedError

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

    def _cleanup_dirs(self, prefix: str) -> None:
        """Remove empty directories left after deleting ``prefix`` (file systems only)."""

    def _barrier(self, keys: builtins.list[str]) -> None:
        """Durability barrier for earlier writes (object stores: nothing to do)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


def _as_bytes(view: Buffer) -> memoryview:
    return memoryview(view).cast("B") if isinstance(view, memoryview) else memoryview(view)


class LocalStorage(Storage):
    """A directory on a local (or mounted) file system: vectored I/O straight from tensor memory.

    Durability: with ``fsync=True`` (the default) every object written is on disk once a `barrier`
    covering it returns. On Linux that barrier is one ``syncfs(2)`` of the file system; elsewhere
    each file is fsync'ed as it is written and the barrier fsyncs the directories.
    """

    def __init__(self, path: str, retry: RetryPolicy | None = None, *, fsync: bool = True) -> None:
        path = os.path.abspath(os.path.expanduser(path.removeprefix("file://")))
        super().__init__(path, retry)
        self.root = path
        self.durable = fsync
        self._made_dirs: set[str] = set()
        self._durable_chains: set[str] = set()  # directories whose whole chain up to root was fsync'ed
        self._synced_files: set[str] = set()  # written with their fsync (write_durable); the barrier skips them
        self._lock = threading.Lock()

    def _path(self, key: str) -> str:
        return os.path.join(self.root, key) if key else self.root

    def _makedirs(self, directory: str) -> None:
        if directory not in self._made_dirs:
            os.makedirs(directory, exist_ok=True)
            self._made_dirs.add(directory)

    def _write(self, key: str, parts: list[Buffer], sync: bool = False) -> None:
        path = self._path(key)
        directory = os.path.dirname(path)
        self._makedirs(directory)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(path, flags, 0o644)
        except FileNotFoundError:
            # the directory was made earlier but removed since (another process pruned it)
            self._made_dirs.discard(directory)
            self._makedirs(directory)
            fd = os.open(path, flags, 0o644)
        try:
            views = [_as_bytes(p) for p in parts]
            total = sum(v.nbytes for v in views)
            written = 0
            while written < total:
                written += _writev_from(fd, views, written)
            if self.durable and (sync or _SYNCFS is None):
                os.fsync(fd)
                if sync:
                    with self._lock:
                        self._synced_files.add(key)
        finally:
            os.close(fd)

    def _read(self, key: str) -> bytes:
        try:
            with open(self._path(key), "rb") as f:
                return f.read()
        except IsADirectoryError:
            raise _not_an_object(self._path(key)) from None

    def _read_into(self, key: str, parts: Sequence[memoryview]) -> None:
        fd = os.open(self._path(key), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            views = [_as_bytes(p) for p in parts]
            expected = sum(v.nbytes for v in views)
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise _not_an_object(self._path(key))
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
        st = os.stat(self._path(key))
        if not stat.S_ISREG(st.st_mode):
            raise _not_an_object(self._path(key))
        return st.st_size

    def _list(self, prefix: str) -> list[str]:
        top = self._path(prefix)
        if os.path.isfile(top):
            return [prefix]
        out = []
        for dirpath, _dirs, files in os.walk(top):
            rel = os.path.relpath(dirpath, self.root)
            for name in files:
                out.append(name if rel == "." else f"{rel}/{name}".replace(os.sep, "/"))
        return out

    def _list_dirs(self, prefix: str) -> list[str]:
        try:
            with os.scandir(self._path(prefix)) as it:
                return [e.name for e in it if e.is_dir(follow_symlinks=False)]
        except (FileNotFoundError, NotADirectoryError):
            return []

    def _delete(self, keys: list[str]) -> None:
        for key in keys:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(key))

    def _cleanup_dirs(self, prefix: str) -> None:
        top = self._path(prefix)
        for dirpath, _dirs, _files in sorted(os.walk(top, topdown=False), key=lambda w: -len(w[0])):
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)
        self._made_dirs = {d for d in self._made_dirs if not d.startswith(top)}
        with self._lock:
            self._durable_chains = {d for d in self._durable_chains if not d.startswith(top)}

    def _barrier(self, keys: list[str]) -> None:
        if not self.durable:
            return
        if _SYNCFS is not None and len(keys) > _FSYNC_MAX_KEYS:
            # one syncfs(2) flushes every write and directory entry of the file system with a single
            # journal commit; fsync'ing hundreds of files and directories costs one commit each.
            # For a few keys (a log segment) it is the other way round: syncfs would also flush
            # whatever else is dirty on the file system (a snapshot being written, other jobs)
            fd = os.open(self.root, os.O_RDONLY)
            try:
                if _SYNCFS(fd) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"syncfs failed: {os.strerror(err)}", self.root)
            finally:
                os.close(fd)
            return
        if _SYNCFS is not None:  # the writes skipped their fsync, counting on this barrier
            for key in keys:
                with self._lock:
                    if key in self._synced_files:
                        self._synced_files.discard(key)
                        continue
                fd = os.open(self._path(key), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        # the directory holding each key (its new entry); the chain above it up to the run
        # directory only the first time this process makes something durable there
        dirs: set[str] = set()
        for key in keys:
            d = os.path.dirname(self._path(key))
            dirs.add(d)
            with self._lock:
                if d in self._durable_chains:
                    continue
                self._durable_chains.add(d)
            d = os.path.dirname(d)
            while d.startswith(self.root) and d not in dirs:
                dirs.add(d)
                d = os.path.dirname(d)
        for d in sorted(dirs, key=len, reverse=True):
            fd = os.open(d, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


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


class _TornWrite(ConnectionError):
    """A write the storage reported as done left fewer bytes than were written (retried)."""


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
    """Any fsspec file system: object stores, memory, wrappers. Writes whole objects only."""

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

    def _path(self, key: str) -> str:
        return f"{self.root}/{key}" if key else self.root

    def _rel(self, path: str) -> str:
        path = path.rstrip("/")
        root = self.root.lstrip("/")
        stripped = path.lstrip("/")
        return stripped[len(root) :].lstrip("/") if stripped.startswith(root) else stripped

    def _write(self, key: str, parts: list[Buffer], sync: bool = False) -> None:
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        self.fs.pipe_file(self._path(key), bytes(data) if isinstance(data, memoryview) else data)
        if self.verify_writes:
            size = data.nbytes if isinstance(data, memoryview) else len(data)
            stored = self._size(key)
            if stored != size:  # raised inside the retried call: the write is made again
                raise _TornWrite(f"a write of {size} bytes left {stored} bytes (torn)")

    def _read(self, key: str) -> bytes:
        try:
            return bytes(self.fs.cat_file(self._path(key)))
        except IsADirectoryError:
            raise _not_an_object(self._path(key)) from None

    def _size(self, key: str) -> int:
        info = self.fs.info(self._path(key))
        if info.get("type") == "directory":
            raise FileNotFoundError(self._path(key))
        return int(info["size"])

    def _list(self, prefix: str) -> list[str]:
        try:
            found = self.fs.find(self._path(prefix))
        except FileNotFoundError:
            return []
        return [self._rel(p) for p in found]

    def _list_dirs(self, prefix: str) -> list[str]:
        try:
            entries = self.fs.ls(self._path(prefix), detail=True)
        except FileNotFoundError:
            return []
        return [e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "directory"]

    def _delete(self, keys: list[str]) -> None:
        paths = [self._path(k) for k in keys]
        try:
            self.fs.rm(paths)
        except FileNotFoundError:
            for p in paths:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm_file(p)

    def _cleanup_dirs(self, prefix: str) -> None:
        path = self._path(prefix)
        try:
            if self.fs.isdir(path):
                self.fs.rm(path, recursive=True)
        except (FileNotFoundError, NotImplementedError):
            pass
        finally:
            self.fs.invalidate_cache()


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
