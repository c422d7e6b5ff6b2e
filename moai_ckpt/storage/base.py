"""`Storage`, the one storage layer: a checked, retried public surface built on a few hooks.

Every byte moai-ckpt moves goes through a `Storage`. Its public methods own the invariants, once
for every back end: key safety (`moai_ckpt.keys`), retries with backoff and a deadline
(`moai_ckpt.storage.retry`), error classification, naming the URL and operation on failure,
bounded metadata reads, and listings that skip names outside the key alphabet. A back end
implements the hooks, the ``_``-prefixed methods at the bottom (`_write`, `_read`, `_size`,
`_list`, `_list_dirs`, `_delete`, `_delete_tree`; the others have defaults), and declares what
it can do in the ``supports_*`` flags; code above reads the flags, never a back end's type.

Nothing relies on rename or append, which object stores lack; writer fencing relies on
`Storage.create`, an exclusive create where the back end has one. Storage is untrusted: links
and special files are refused, metadata reads are bounded, and names outside the key alphabet
are skipped by listings and deleted by `Storage.delete_tree` without being parsed.

Paths stay ``str`` end to end: a ``pathlib.Path`` would collapse the ``//`` in ``s3://``.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

from moai_ckpt.errors import ObjectTooLargeError, TruncatedDataError, UnsafeEntryError
from moai_ckpt.keys import check_key, is_safe_key, warn_once
from moai_ckpt.storage.retry import RetryPolicy, call_with_retries

T = TypeVar("T")
Buffer = bytes | bytearray | memoryview

#: the default bound on one object read whole (`Storage.read`)
DEFAULT_OBJECT_LIMIT = 4 << 30
#: the default bound on one metadata object (`Storage.read_record`)
DEFAULT_RECORD_LIMIT = 64 << 20
_TORN_REWRITES = 4  # an emulated exclusive create rewrites its own torn object this often


class _TornWrite(ConnectionError):
    """A write the storage reported as done left fewer bytes than were written (retried)."""


class Storage:
    """A run directory on some storage, addressed by safe relative keys.

    Abstract: a back end subclasses it, implements the hooks (the ``_``-prefixed methods at the
    end, which raise `NotImplementedError` here, as fsspec's ``AbstractFileSystem`` does) and
    sets the ``supports_*`` flags. Everything public is built on those hooks, once, here.

    Args:
        url: the run directory (a plain path or any fsspec URL).
        retry: how transient faults are retried.
    """

    #: a `barrier` makes earlier writes durable (False: a scratch disk, no fsync)
    durable: bool = True
    #: a write that returns has stored every byte: an object store's PUT lands whole or not at
    #: all, a local file is written through its descriptor until every byte is in. Where False
    #: (network and FUSE file systems, wrappers) the size is read back after each write, and a
    #: torn write is written again
    supports_atomic_put: bool = True
    #: `create` is atomic against other processes (``O_EXCL``, a conditional PUT). Where it is
    #: not, `create` checks, writes and reads back: two writers racing for one key may both
    #: believe they won, so fencing between writers is only as strong as that (docs/security.md)
    supports_exclusive_create: bool = True
    #: `newest_change` can tell when something below a prefix last changed (modification times
    #: in listings); where False it answers None, and nothing is ever taken for abandoned
    supports_modification_times: bool = False
    #: a read can stop after a byte range: `read_record` then fetches at most ``limit + 1``
    #: bytes instead of asking for the size first
    supports_ranged_reads: bool = False
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
        parts = _parts(data)
        self._call("write", key, lambda: self._put(key, parts))

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
        """Whether an object exists at ``key`` (a prefix with objects below is not one)."""
        try:
            self.size(key)
        except FileNotFoundError:
            return False
        return True

    def list(self, prefix: str = "") -> builtins.list[str]:
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
        if not self.supports_modification_times:
            return None
        return self._call("list", prefix, lambda: self._newest_change(prefix))

    def write_durable(self, key: str, data: Buffer | Sequence[Buffer]) -> None:
        """`write` then `barrier` for one object (a local disk fsyncs it before closing it)."""
        parts = _parts(data)
        self._call("write", key, lambda: self._put(key, parts, sync=True))
        self.barrier([key])

    def make_dirs(self, prefixes: Iterable[str]) -> None:
        """Make the directories ``prefixes`` of objects about to be written, once, top-down.

        For a tree of new objects (a snapshot being written) it saves every write finding its own
        way down; writes make missing directories anyway. Object stores have none: a no-op.
        """
        found = sorted({check_key(p, url=self.url) for p in prefixes})
        if found:
            self._call("write", found[0], lambda: self._make_dirs(found))

    def barrier(self, keys: Iterable[str]) -> None:
        """Make the objects at ``keys`` and their directory entries durable.

        Object stores make a write durable when it returns, so there it is a no-op; local disks
        flush here. Call it before anything that vouches for those objects (a commit marker).
        """
        keys = [check_key(k, url=self.url) for k in keys]
        self._call("sync", keys[0] if keys else "", lambda: self._barrier(keys))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    # -- shared machinery --------------------------------------------------------------------

    def _call(self, op: str, key: str, fn: Callable[[], T]) -> T:
        if key:
            check_key(key, url=self.url)
        return call_with_retries(fn, policy=self.retry, op=op, url=self.url, key=key)

    def _put(self, key: str, parts: builtins.list[Buffer], sync: bool = False) -> None:
        """`_write`, then, where a write may come back torn, its size read back (`_TornWrite` is retried)."""
        self._write(key, parts, sync)
        self._verify_put(key, sum(memoryview(p).nbytes for p in parts))

    def _verify_put(self, key: str, nbytes: int) -> None:
        if not self.supports_atomic_put:
            stored = self._size(key)
            if stored != nbytes:  # raised inside the retried call: the write is made again
                raise _TornWrite(f"a write of {nbytes} bytes left {stored} bytes (torn)")

    def _stored_equals(self, key: str, data: bytes) -> bool:
        """Whether the object at ``key`` holds exactly ``data`` (read no more than that)."""
        try:
            return self._read_record(key, len(data)) == data
        except (FileNotFoundError, ObjectTooLargeError):
            return False

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

    # -- hooks a back end implements ---------------------------------------------------------

    def _write(self, key: str, parts: builtins.list[Buffer], sync: bool = False) -> None:
        """Store ``parts``, in order, as the whole object at ``key`` (``sync``: durable when it returns)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement _write")

    def _read(self, key: str) -> bytes:
        """The whole object at ``key``; `FileNotFoundError` if there is none."""
        raise NotImplementedError(f"{type(self).__name__} does not implement _read")

    def _size(self, key: str) -> int:
        """The object's size; `FileNotFoundError` if there is none (a directory is none)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement _size")

    def _list(self, prefix: str) -> builtins.list[str]:
        """Every object key below ``prefix``, relative to the run directory, in any order."""
        raise NotImplementedError(f"{type(self).__name__} does not implement _list")

    def _list_dirs(self, prefix: str) -> builtins.list[str]:
        """The names of the immediate sub-directories of ``prefix``."""
        raise NotImplementedError(f"{type(self).__name__} does not implement _list_dirs")

    def _delete(self, keys: builtins.list[str]) -> None:
        """Delete the objects at ``keys``; missing ones are no error."""
        raise NotImplementedError(f"{type(self).__name__} does not implement _delete")

    def _delete_tree(self, prefix: str, first: builtins.list[str], keep: set[str]) -> None:
        """See `delete_tree`."""
        raise NotImplementedError(f"{type(self).__name__} does not implement _delete_tree")

    # -- hooks with a default ----------------------------------------------------------------

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
                self._put(key, [data])
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

    def _read_record(self, key: str, limit: int) -> bytes:
        """The object at ``key``, refused unread (`ObjectTooLargeError`) when it is over ``limit``."""
        if self.supports_ranged_reads:
            # one ranged read fetches at most one byte past the limit: never the whole of a huge object
            data = self._read_range(key, limit + 1)
            if len(data) > limit:
                raise self._too_large(key, f"more than {limit}", limit)
            return data
        size = self._size(key)
        if size > limit:
            raise self._too_large(key, size, limit)
        data = self._read(key)
        if len(data) > limit:  # grew in between
            raise self._too_large(key, len(data), limit)
        return data

    def _read_range(self, key: str, length: int) -> bytes:
        """The first ``length`` bytes of the object (all of it if shorter); with `supports_ranged_reads`."""
        raise NotImplementedError(f"{type(self).__name__} does not implement _read_range")

    def _read_into(self, key: str, parts: Sequence[memoryview]) -> None:
        data = self._read(key)
        expected = sum(p.nbytes for p in parts)
        if len(data) != expected:
            raise TruncatedDataError(f"object is {len(data)} bytes, expected {expected}", url=self.url, key=key)
        offset = 0
        for p in parts:
            p.cast("B")[:] = data[offset : offset + p.nbytes]
            offset += p.nbytes

    def _newest_change(self, prefix: str) -> float | None:
        """Unix time of the newest change below ``prefix``; with `supports_modification_times`."""
        return None

    def _barrier(self, keys: builtins.list[str]) -> None:
        """Durability barrier for earlier writes (object stores: nothing to do)."""

    def _make_dirs(self, prefixes: builtins.list[str]) -> None:
        """Make directories for objects to come (object stores: nothing to do)."""


def _parts(data: Buffer | Sequence[Buffer]) -> list[Buffer]:
    return [data] if isinstance(data, (bytes, bytearray, memoryview)) else list(data)


def not_an_object(path: str) -> FileNotFoundError:
    """The answer for a key that names a directory: a key names an object, and a directory (a
    prefix with objects below) is not one, as on S3."""
    return FileNotFoundError(errno.ENOENT, "no object here (it is a directory)", path)
