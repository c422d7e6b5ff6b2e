"""`FsspecStorage`: a run directory on any fsspec file system (object stores, memory, wrappers).

Writes whole objects only (no append, no rename). Exclusive create is a conditional PUT on S3,
``O_EXCL`` on a bare local file system (through the no-follow walk), the memory file system's own
``xb``, and emulated (check, write, read back, with a warning the first time a writer relies on
it) anywhere else. Whether a put is atomic is read off the file system when the storage is
opened (object stores: yes); a bounded read is one ranged read everywhere.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
from datetime import datetime

import fsspec
from fsspec.implementations.chained import ChainedFileSystem
from fsspec.implementations.local import LocalFileSystem
from fsspec.spec import AbstractFileSystem

from moai_ckpt.errors import redact_url
from moai_ckpt.keys import warn_once
from moai_ckpt.storage import nofollow
from moai_ckpt.storage.base import Buffer, Storage, not_an_object
from moai_ckpt.storage.local import write_fd
from moai_ckpt.storage.nofollow import NoFollowTree
from moai_ckpt.storage.retry import RetryPolicy

log = logging.getLogger("moai_ckpt.storage")

_ATOMIC_PUT_PROTOCOLS = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "memory", "oss", "r2"}
#: back ends whose ``pipe_file(mode="create")`` is an atomic exclusive create: s3fs sends
#: ``If-None-Match: *`` (AWS S3 and the moto server honour it); memory opens with ``xb``
_NATIVE_CREATE_PROTOCOLS = {"s3", "s3a", "memory"}


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

    supports_modification_times = True  # each back end's own field: mtime, LastModified, updated...
    supports_ranged_reads = True  # ``cat_file(start, end)``: one request, never the whole of a huge object

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, url: str, retry: RetryPolicy | None = None) -> None:
        super().__init__(url, retry)
        self.fs = fs
        # Object stores put an object whole or not at all; elsewhere (network and FUSE file
        # systems, wrappers) a write may report success and keep a prefix: read its size back
        self.supports_atomic_put = bool(_protocols(fs) & _ATOMIC_PUT_PROTOCOLS)
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
                write_fd(fd, [data])
            finally:
                os.close(fd)
            return
        self.fs.pipe_file(self._path(key), data, mode="create")  # If-None-Match: * on S3
        self._verify_put(key, len(data))

    def _read(self, key: str) -> bytes:
        self._guard(key)
        try:
            return bytes(self.fs.cat_file(self._path(key)))
        except IsADirectoryError:
            raise not_an_object(self._path(key)) from None

    def _read_range(self, key: str, length: int) -> bytes:
        self._guard(key)  # a local file system: no link on the way, and a regular file (a FIFO never blocks)
        try:
            return bytes(self.fs.cat_file(self._path(key), start=0, end=length))
        except IsADirectoryError:
            raise not_an_object(self._path(key)) from None
        except OSError as exc:
            # S3 answers a range on an empty object with 416 (EINVAL): read its size instead
            if exc.errno != errno.EINVAL or self._size(key) != 0:
                raise
            return b""

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
