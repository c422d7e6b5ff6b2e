"""A directory tree reached without ever following a link: the local back end's path walker.

Every key is opened one segment at a time, each relative to its parent's descriptor (``openat``)
with ``O_NOFOLLOW``, so a symbolic link planted anywhere below the root
(``snapshots/000000000020 -> /home/victim``) is refused instead of followed, and nothing below
the root can lead outside it. Files are opened non-blocking and checked with ``fstat`` before a
byte moves: a FIFO, socket or device is refused at once, never read (a FIFO would block forever).
Only the root itself may be reached through links: it is the path the user named.

Deleting walks the same way and removes entries by name (``unlinkat``): a link is removed, never
its target, and names need not be valid keys (``.nfs…`` files, non-UTF-8 names).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import Any

from moai_ckpt.errors import UnsafeEntryError

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
DIR_FLAGS = os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC
READ_FLAGS = os.O_RDONLY | _NOFOLLOW | getattr(os, "O_NONBLOCK", 0) | _CLOEXEC
WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | _NOFOLLOW | getattr(os, "O_NONBLOCK", 0) | _CLOEXEC
CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC

#: what `kind_of` calls the entries it finds
FILE, DIR, LINK, OTHER = "file", "directory", "symbolic link", "special file (FIFO, socket or device)"


def kind_of(mode: int) -> str:
    if stat.S_ISREG(mode):
        return FILE
    if stat.S_ISDIR(mode):
        return DIR
    if stat.S_ISLNK(mode):
        return LINK
    return OTHER


@dataclass(frozen=True)
class Entry:
    """One entry found by `NoFollowTree.walk`: its path below the walked prefix, kind and times."""

    parts: tuple[str, ...]
    kind: str
    mtime: float


class NoFollowTree:
    """Keys below ``root``, opened and removed without following links.

    Args:
        root: the run directory (absolute; links in it are the user's own and are followed).
        refuse: builds the error for an entry that is not what a key may be (key, what it is).
    """

    def __init__(self, root: str, refuse: Callable[[str, str], UnsafeEntryError]) -> None:
        self.root = root
        self.refuse = refuse

    # -- directories ------------------------------------------------------------------------------

    def _open_root(self, create: bool) -> int:
        try:
            return os.open(self.root, os.O_RDONLY | _DIRECTORY | _CLOEXEC)
        except FileNotFoundError:
            if not create:
                raise
            os.makedirs(self.root, exist_ok=True)
            return os.open(self.root, os.O_RDONLY | _DIRECTORY | _CLOEXEC)

    def _descend(self, fd: int, name: str, where: str, create: bool) -> int:
        """Open the sub-directory ``name`` of ``fd`` (made first with ``create``), never a link."""
        try:
            return os.open(name, DIR_FLAGS, dir_fd=fd)
        except FileNotFoundError:
            if not create:
                raise
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o755, dir_fd=fd)
            try:
                return os.open(name, DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                raise self._not_a_directory(fd, name, where, create, exc) from None
        except OSError as exc:
            if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
                raise
            raise self._not_a_directory(fd, name, where, create, exc) from None

    def _not_a_directory(self, fd: int, name: str, where: str, create: bool, exc: OSError) -> Exception:
        """What a path segment that is not a directory means: a link or special file is refused;
        a plain file means the key does not exist (reading) or cannot be made (writing)."""
        try:
            kind = kind_of(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode)
        except FileNotFoundError:
            return exc
        if kind == FILE:
            if create:
                return NotADirectoryError(errno.ENOTDIR, "a file is in the way of a directory", where)
            return FileNotFoundError(errno.ENOENT, "no such object (a file is where a directory would be)", where)
        if kind == DIR:
            return exc
        return self.refuse(where, kind)

    @contextlib.contextmanager
    def directory(self, parts: Collection[str], *, create: bool = False) -> Iterator[int]:
        """A descriptor of the directory ``root/parts...``, reached segment by segment."""
        fd = self._open_root(create)
        try:
            done: list[str] = []
            for name in parts:
                done.append(name)
                nxt = self._descend(fd, name, "/".join(done), create)
                os.close(fd)
                fd = nxt
            yield fd
        finally:
            os.close(fd)

    def make_dirs(self, prefixes: Collection[str]) -> None:
        """Make the directories ``prefixes`` (and those above them) once, top-down.

        One walk over the tree they form: each directory is opened (never through a link) or made
        with a single ``mkdir`` below its parent's descriptor, and descended into while its
        children are made; no path is resolved twice and nothing is ``stat``-ed first.
        """
        tree: dict[str, Any] = {}
        for prefix in prefixes:
            node = tree
            for name in prefix.split("/") if prefix else []:
                node = node.setdefault(name, {})
        fd = self._open_root(create=True)
        try:
            self._make_below(fd, tree, [])
        finally:
            os.close(fd)

    def _make_below(self, fd: int, tree: dict[str, Any], done: list[str]) -> None:
        for name, below in tree.items():
            where = [*done, name]
            if not below:  # a leaf: made, not entered
                try:
                    os.mkdir(name, 0o755, dir_fd=fd)
                except FileExistsError:
                    os.close(self._descend(fd, name, "/".join(where), create=True))  # a directory, not a link
                continue
            sub = self._descend(fd, name, "/".join(where), create=True)
            try:
                self._make_below(sub, below, where)
            finally:
                os.close(sub)

    @contextlib.contextmanager
    def parent(self, key: str, *, create: bool = False) -> Iterator[tuple[int, str]]:
        """The descriptor of ``key``'s directory and ``key``'s last segment."""
        *parts, leaf = key.split("/")
        with self.directory(parts, create=create) as fd:
            yield fd, leaf

    # -- files --------------------------------------------------------------------------------------

    def open(self, key: str, flags: int, *, create_dirs: bool = False) -> tuple[int, os.stat_result]:
        """Open ``key`` with ``flags`` (which must hold ``O_NOFOLLOW``); refuse anything but a file.

        Returns the descriptor and its ``fstat``. A directory raises `IsADirectoryError`.
        """
        with self.parent(key, create=create_dirs) as (dfd, leaf):
            try:
                fd = os.open(leaf, flags, 0o644, dir_fd=dfd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENXIO, errno.ENOTDIR):
                    raise self._refused_at(dfd, leaf, key, exc) from None
                raise
        try:
            st = os.fstat(fd)
            kind = kind_of(st.st_mode)
            if kind == DIR:
                raise IsADirectoryError(errno.EISDIR, "a directory, not an object", key)
            if kind != FILE:
                raise self.refuse(key, kind)
        except BaseException:
            os.close(fd)
            raise
        return fd, st

    def _refused_at(self, dfd: int, leaf: str, key: str, exc: OSError) -> Exception:
        try:
            kind = kind_of(os.stat(leaf, dir_fd=dfd, follow_symlinks=False).st_mode)
        except OSError:
            return exc
        return self.refuse(key, kind) if kind not in (FILE, DIR) else exc

    def lstat(self, key: str) -> os.stat_result:
        """``key``'s own status (a link is reported as one); FileNotFoundError when absent."""
        with self.parent(key) as (dfd, leaf):
            return os.stat(leaf, dir_fd=dfd, follow_symlinks=False)

    def unlink(self, key: str) -> None:
        """Remove the entry ``key`` (a link itself, never its target); absent is fine."""
        try:
            with self.parent(key) as (dfd, leaf), contextlib.suppress(FileNotFoundError):
                os.unlink(leaf, dir_fd=dfd)
        except FileNotFoundError:
            pass

    # -- walking ------------------------------------------------------------------------------------

    def walk(self, prefix: str) -> list[Entry]:
        """Every entry below ``prefix`` (directories too), without following links.

        ``prefix`` itself must be a directory; a missing one has no entries.
        """
        parts = prefix.split("/") if prefix else []
        try:
            with self.directory(parts) as fd:
                return list(self._walk(fd, ()))
        except FileNotFoundError:
            return []

    def _walk(self, fd: int, below: tuple[str, ...]) -> Iterator[Entry]:
        with os.scandir(fd) as it:
            entries = list(it)
        for e in entries:
            try:
                st = e.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed meanwhile
            kind = kind_of(st.st_mode)
            parts = (*below, e.name)
            yield Entry(parts, kind, st.st_mtime)
            if kind == DIR:
                try:
                    sub = os.open(e.name, DIR_FLAGS, dir_fd=fd)
                except OSError:
                    continue  # replaced by something else meanwhile: its entry was reported
                try:
                    yield from self._walk(sub, parts)
                finally:
                    os.close(sub)

    # -- removing -----------------------------------------------------------------------------------

    def remove_tree(self, prefix: str, *, first: Collection[str] = (), keep: Collection[str] = ()) -> None:
        """Remove ``prefix`` and everything below it, whatever the names and kinds of the entries.

        Everything is walked and checked first (each directory must let us remove its entries),
        then the keys in ``first`` go (a marker that vouches for the rest), then everything else
        except ``keep``. A ``prefix`` that is a link or a file is removed itself.

        Raises:
            PermissionError: something below cannot be removed; nothing was removed.
        """
        try:
            with self.parent(prefix) as (dfd, leaf):
                kind = kind_of(os.stat(leaf, dir_fd=dfd, follow_symlinks=False).st_mode)
                if kind != DIR:
                    if prefix not in keep:
                        os.unlink(leaf, dir_fd=dfd)
                    return
        except FileNotFoundError:
            return
        base = prefix.split("/")
        entries = self.walk(prefix)
        self._check_removable(base, [e.parts for e in entries if e.kind == DIR])
        kept = {tuple(k.split("/"))[len(base) :] for k in keep if k.startswith(prefix + "/")}
        for key in first:
            if key.startswith(prefix + "/") and key not in keep:
                self.unlink(key)
        held = {parts[:i] for parts in kept for i in range(1, len(parts))}
        try:
            with self.directory(base) as fd:
                self._clear(fd, (), kept, held)
        except FileNotFoundError:
            return
        if not kept:
            with contextlib.suppress(FileNotFoundError), self.parent(prefix) as (dfd, leaf):
                _rmdir(leaf, dfd)

    def _clear(self, fd: int, below: tuple[str, ...], kept: set[tuple[str, ...]], held: set[tuple[str, ...]]) -> None:
        """Remove the entries of the directory ``fd`` (``below`` the prefix), depth first."""
        with os.scandir(fd) as it:
            entries = list(it)
        for e in entries:
            parts = (*below, e.name)
            if parts in kept:
                continue
            try:
                is_dir = stat.S_ISDIR(e.stat(follow_symlinks=False).st_mode)
            except FileNotFoundError:
                continue
            if not is_dir:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(e.name, dir_fd=fd)
                continue
            try:
                sub = os.open(e.name, DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                continue
            try:
                self._clear(sub, parts, kept, held)
            finally:
                os.close(sub)
            if parts not in held:
                _rmdir(e.name, fd)

    def _check_removable(self, base: list[str], dirs: list[tuple[str, ...]]) -> None:
        for parts in [(), *dirs]:
            with self.directory([*base, *parts]) as fd:
                # faccessat on the descriptor itself: may we unlink names in this directory?
                if not os.access(".", os.W_OK | os.X_OK, dir_fd=fd):
                    where = "/".join([*base, *parts])
                    raise PermissionError(errno.EACCES, "cannot remove the entries of this directory", where)


def _rmdir(name: str, dir_fd: int) -> None:
    """Remove an emptied directory; one that is gone or was refilled meanwhile is left as it is."""
    try:
        os.rmdir(name, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.ENOTEMPTY, errno.EEXIST):
            raise
