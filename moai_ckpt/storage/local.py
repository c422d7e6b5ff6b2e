"""`LocalStorage`: a run directory on a local (or mounted) file system, never following a link.

Objects are written and read with vectored I/O straight from and into tensor memory, every key
reached through `moai_ckpt.storage.nofollow.NoFollowTree` (one ``openat`` per segment with
``O_NOFOLLOW``), and made durable with one ``syncfs(2)`` or a few ``fsync`` calls per barrier.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from collections.abc import Callable, Sequence
from typing import cast

from moai_ckpt.errors import TruncatedDataError
from moai_ckpt.keys import warn_once
from moai_ckpt.storage import nofollow
from moai_ckpt.storage.base import Buffer, Storage, not_an_object
from moai_ckpt.storage.nofollow import NoFollowTree
from moai_ckpt.storage.retry import RetryPolicy

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
_FSYNC_MAX_KEYS = 8  # barriers over more keys than this use one syncfs
_READAHEAD_MIN = 1 << 20


def _writev_from(fd: int, views: list[memoryview], offset: int) -> int:
    return os.writev(fd, _slice_views(views, offset)[:_IOV_MAX])


def _readv_into(fd: int, views: list[memoryview], offset: int) -> int:
    return os.readv(fd, _slice_views(views, offset)[:_IOV_MAX])


class LocalStorage(Storage):
    """A directory on a local (or mounted) file system: vectored I/O straight from tensor memory.

    Every key is reached through `NoFollowTree`: one ``openat`` per segment with ``O_NOFOLLOW``,
    so no link below the run directory is ever followed and a FIFO or device is refused before it
    is read. An object with other hard links is replaced, not written through.

    Durability: with ``fsync=True`` (the default) every object written is on disk once a `barrier`
    covering it returns. On Linux that barrier is one ``syncfs(2)`` of the file system; elsewhere
    each file is fsync'ed as it is written and the barrier fsyncs the directories.
    """

    supports_modification_times = True

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
            write_fd(fd, parts)
            if self.durable and (sync or _SYNCFS is None):
                os.fsync(fd)
                if sync:
                    with self._lock:
                        self._synced_files.add(key)
        finally:
            os.close(fd)

    def _make_dirs(self, prefixes: list[str]) -> None:
        self.tree.make_dirs(prefixes)

    def _create(self, key: str, data: bytes) -> None:
        fd, _ = self.tree.open(key, nofollow.CREATE_FLAGS, create_dirs=True)  # O_EXCL: FileExistsError
        try:
            write_fd(fd, [data])
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
            raise not_an_object(self._path(key)) from None

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
            raise not_an_object(self._path(key))
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
            max([top, *(e.mtime for e in self.tree.walk(prefix))]) if self._prefix_kind(prefix) == nofollow.DIR else top
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


def write_fd(fd: int, parts: Sequence[Buffer]) -> None:
    """Write every byte of ``parts``, in order, to the descriptor (as few ``writev`` calls as it takes)."""
    views = [_as_bytes(p) for p in parts]
    total = sum(v.nbytes for v in views)
    written = 0
    while written < total:
        written += _writev_from(fd, views, written)


def _as_bytes(view: Buffer) -> memoryview:
    return memoryview(view).cast("B") if isinstance(view, memoryview) else memoryview(view)


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


def _slice_views(views: list[memoryview], offset: int) -> list[memoryview]:
    out = []
    for v in views:
        if offset >= v.nbytes:
            offset -= v.nbytes
            continue
        out.append(v[offset:])
        offset = 0
    return out
