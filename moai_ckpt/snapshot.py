"""Reading one snapshot directory back, with every check on the way in (`moai_ckpt.snapshot_writer` writes one).

`SnapshotReader` trusts nothing it has not checked: the marker's own checksum and version, the
manifest's and rank indexes' sha256 against the marker, each array's record by
arithmetic (dtype, chunk grid, bytes under a limit) before any list or tensor is built from it,
each array's whole ``zarr.json`` against the manifest, chunk coverage against the rank indexes,
and every chunk's crc32c. Chunk reads and ``zarr.json`` checks all run at once, one job per I/O
thread over the list of chunks; a restore to CUDA copies each chunk to the device once checked.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import torch

from moai_ckpt import arrays as za
from moai_ckpt.dtypes import StoredDtype, from_name, torch_dtype
from moai_ckpt.errors import (
    CorruptSnapshotError,
    LimitExceededError,
    ManifestMismatchError,
    MissingDataError,
    MoaiCkptError,
    SnapshotNotFoundError,
    StorageError,
    TruncatedDataError,
)
from moai_ckpt.format import (
    FORMAT_VERSION,
    ArrayRecord,
    ChunkEntry,
    Manifest,
    RankIndex,
    load_commit,
    load_record,
    sha256,
)
from moai_ckpt.iopool import for_each
from moai_ckpt.layout import (
    array_metadata_key,
    chunk_key,
    chunk_name,
    commit_key,
    group_key,
    in_snapshot,
    manifest_key,
    rank_index_key,
    snapshot_dir,
)
from moai_ckpt.storage import Storage
from moai_ckpt.tree import decode, tensor_refs

Progress = Callable[[int], None]

#: the largest array a reader allocates unless told otherwise (`CheckpointerOptions.max_array_bytes`)
DEFAULT_MAX_ARRAY_BYTES = 1 << 40


def group_attributes(step: int, version: int = FORMAT_VERSION) -> dict[str, Any]:
    return {za.MOAI_ATTR: {"format_version": version, "step": step}}


@dataclass
class _ArrayRead:
    """One array being read: where its bytes go, the chunks to read, its ``zarr.json`` checked once."""

    name: str
    record: ArrayRecord
    host: torch.Tensor
    #: the byte range of the array the read covers (its rows)
    lo: int
    hi: int
    spans: list[tuple[za.ChunkSpan, ChunkEntry]]
    #: the device tensor each checked chunk is copied into (reads bound for CUDA), else None
    device: torch.Tensor | None = None
    _separator: str | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def bytes(self) -> memoryview:
        return za.tensor_bytes(self.host)

    def separator(self, check: Callable[[ArrayRecord], str]) -> str:
        """The chunk key separator, from the ``zarr.json`` ``check`` reads and checks (once per array)."""
        with self._lock:
            if self._separator is None:
                self._separator = check(self.record)
            return self._separator

    def to_device(self, start: int, stop: int) -> None:
        """Queue the copy of bytes ``start:stop`` (checked already) from pinned memory to the device."""
        if self.device is not None and stop > start:
            _flat_bytes(self.device)[start:stop].copy_(_flat_bytes(self.host)[start:stop], non_blocking=True)


def _flat_bytes(t: torch.Tensor) -> torch.Tensor:
    flat = t.reshape(-1)
    return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)


def _largest_first(item: tuple[_ArrayRead, za.ChunkSpan | None, ChunkEntry | None]) -> int:
    span = item[1]
    return -(span.stop - span.start) if span is not None else 0


@dataclass
class Fault:
    """One problem found by verification."""

    key: str
    kind: str
    message: str


class SnapshotReader:
    """A committed snapshot, opened and validated (marker, manifest, rank indexes).

    Args:
        storage: the run directory.
        step: the snapshot to open.
        executor: runs the chunk reads.
        max_array_bytes: the largest array this reader allocates; a record asking for more is
            refused with `LimitExceededError` before anything is built from it.
    """

    def __init__(
        self, storage: Storage, step: int, executor: Executor, *, max_array_bytes: int = DEFAULT_MAX_ARRAY_BYTES
    ) -> None:
        self.storage = storage
        self.step = step
        self.executor = executor
        self.max_array_bytes = max_array_bytes
        self.prefix = snapshot_dir(step)
        url = storage.url
        try:
            marker_bytes = storage.read_record(commit_key(step))
        except FileNotFoundError:
            raise SnapshotNotFoundError("no committed snapshot at this step", url=url, step=step) from None
        self.marker = load_commit(marker_bytes, url=url, step=step)
        manifest_bytes = self._read_checked(manifest_key(step), self.marker.body.manifest_sha256)
        self.manifest: Manifest = load_record(Manifest, manifest_bytes, url=url, step=step, key=manifest_key(step))
        if self.manifest.step != step:
            raise CorruptSnapshotError(
                f"manifest names step {self.manifest.step}", url=url, step=step, key=manifest_key(step)
            )
        self.chunks: dict[str, dict[tuple[int, ...], ChunkEntry]] = {}
        for ref in self.marker.body.ranks:
            if ref.key != rank_index_key(step, ref.rank):
                raise CorruptSnapshotError(
                    f"rank index key {ref.key!r} is not where it belongs",
                    url=url,
                    step=step,
                    key=commit_key(step),
                )
            index: RankIndex = load_record(
                RankIndex, self._read_checked(ref.key, ref.sha256), url=url, step=step, key=ref.key
            )
            for name, entries in index.chunks.items():
                table = self.chunks.setdefault(name, {})
                for entry in entries:
                    table[entry.index] = entry

    def _read_checked(self, key: str, digest: str) -> bytes:
        try:
            data = self.storage.read_record(key)
        except FileNotFoundError:
            raise MissingDataError(
                "object named by the commit marker is missing", url=self.storage.url, step=self.step, key=key
            ) from None
        if sha256(data) != digest:
            raise CorruptSnapshotError(
                "object does not match the sha256 in the commit marker (tampered or corrupt)",
                url=self.storage.url,
                step=self.step,
                key=key,
            )
        return data

    @property
    def arrays(self) -> dict[str, ArrayRecord]:
        return self.manifest.arrays

    def _error(self, cls: type[MoaiCkptError], message: str, key: str) -> MoaiCkptError:
        """An error whose key is run-relative, like every key moai-ckpt reports."""
        if not key.startswith(self.prefix + "/"):
            key = in_snapshot(self.step, key)
        return cls(message, url=self.storage.url, step=self.step, key=key)

    def _layout(self, record: ArrayRecord) -> StoredDtype:
        """The record's stored dtype, once its layout passed `arrays.check_layout` (arithmetic only)."""
        key = in_snapshot(self.step, record.path)
        return za.check_layout(record, limit=self.max_array_bytes, url=self.storage.url, step=self.step, key=key)

    def _spans(self, record: ArrayRecord) -> list[tuple[za.ChunkSpan, ChunkEntry]]:
        """Every chunk of an array with its rank-index entry; as many as the rank indexes list, at most.

        The chunk count comes from arithmetic, and the spans are generated lazily: a shape that
        claims more chunks than the rank indexes list fails at the first unlisted one, never
        after building a list of what the shape claims.
        """
        stored = self._layout(record)
        count = za.chunk_count(record.shape, record.chunks)
        table = self.chunks.get(record.path, {})
        if len(table) > count:
            raise self._error(
                ManifestMismatchError, f"rank indexes list {len(table)} chunks, the shape implies {count}", record.path
            )
        out = []
        for span in za.chunk_spans(record.shape, record.chunks, stored.itemsize):
            entry = table.get(span.index)
            if entry is None:
                raise self._error(
                    MissingDataError,
                    f"no rank index lists this chunk (the shape implies {count} chunks, the rank indexes list "
                    f"{len(table)})",
                    f"{record.path}/{chunk_name(span.index, za.CHUNK_SEPARATOR)}",
                )
            if entry.nbytes != span.encoded_size:
                raise self._error(
                    ManifestMismatchError,
                    f"rank index records {entry.nbytes} bytes, the manifest implies {span.encoded_size}",
                    f"{record.path}/{chunk_name(span.index, za.CHUNK_SEPARATOR)}",
                )
            out.append((span, entry))
        return out

    def check_metadata(self, record: ArrayRecord) -> str:
        """Check the record's layout, then its whole ``zarr.json`` against what the record implies.

        Returns:
            The separator of the array's chunk keys, as its ``zarr.json`` declares it.
        """
        self._layout(record)
        key = array_metadata_key(self.step, record.path)
        try:
            raw = self.storage.read_record(key)
        except FileNotFoundError:
            raise self._error(MissingDataError, "array is missing (no zarr.json)", record.path) from None
        return za.check_array_metadata(raw, record, url=self.storage.url, step=self.step, key=key)

    def read_array(self, name: str, progress: Progress | None = None) -> torch.Tensor:
        """Read one array into a new CPU tensor, checking metadata, coverage and every crc32c."""
        return self.read_arrays([name], progress)[name]

    def read_arrays(
        self,
        names: Iterable[str] | None = None,
        progress: Progress | None = None,
        rows: dict[str, tuple[int, int]] | None = None,
        devices: Mapping[str, torch.device] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Read many arrays (or ``rows`` of them), every chunk read and metadata check in flight at once.

        Nothing waits for every ``zarr.json`` first: the first read of an array's chunks checks its
        ``zarr.json`` (which names their keys), beside the reads of the other arrays. An array with
        a CUDA device in ``devices`` is read into pinned host memory, and each chunk copied to the
        device as soon as its crc32c passed; it comes back on that device. Nothing comes back
        unless every check passed.
        """
        names = list(self.arrays) if names is None else list(names)
        for name in names:
            if name not in self.arrays:
                raise self._error(ManifestMismatchError, "state references an array the manifest does not list", name)
        reads = [self._plan_read(name, (rows or {}).get(name), (devices or {}).get(name)) for name in names]
        items: list[tuple[_ArrayRead, za.ChunkSpan | None, ChunkEntry | None]] = [
            (read, span, entry) for read in reads for span, entry in read.spans
        ]
        items += [(read, None, None) for read in reads if not read.spans]
        items.sort(key=_largest_first)  # so no thread is left alone with a big chunk at the end
        copying = {read.device.device for read in reads if read.device is not None}
        try:
            for_each(self.executor, items, lambda item: self._read_item(*item, progress), reads=True)
        finally:
            for device in copying:  # the pinned buffers stay alive until their copies are done
                torch.cuda.synchronize(device)
        return {read.name: read.device if read.device is not None else read.host for read in reads}

    def _plan_read(self, name: str, rows: tuple[int, int] | None, device: torch.device | None) -> _ArrayRead:
        """Check chunk coverage (arithmetic) and allocate the rows of ``name`` a read fills (all by default)."""
        record = self.arrays[name]
        spans = self._spans(record)
        itemsize = from_name(record.dtype).itemsize
        total_rows = record.shape[0] if record.shape else 1
        first, last = rows if rows is not None else (0, total_rows)
        if not 0 <= first <= last <= total_rows:
            raise self._error(ManifestMismatchError, f"rows {first}..{last} outside 0..{total_rows}", name)
        shape = (last - first, *record.shape[1:]) if record.shape else ()
        row_bytes = math.prod(record.shape[1:]) * itemsize if record.shape else itemsize
        lo, hi = first * row_bytes, last * row_bytes
        cuda = device is not None and device.type == "cuda"
        host = self._allocate(name, shape, record.dtype, pin=cuda)
        on_device = self._allocate(name, shape, record.dtype, device=device) if cuda else None
        wanted = [(span, entry) for span, entry in spans if span.stop > lo and span.start < hi]
        return _ArrayRead(name, record, host, lo, hi, wanted, on_device)

    def _allocate(
        self, name: str, shape: tuple[int, ...], dtype: str, *, pin: bool = False, device: torch.device | None = None
    ) -> torch.Tensor:
        """An uninitialised tensor; the layout check bounded its size, the host may still refuse it."""
        try:
            return torch.empty(shape, dtype=torch_dtype(dtype), pin_memory=pin, device=device)
        except (RuntimeError, MemoryError) as exc:
            raise self._error(
                LimitExceededError, f"cannot allocate {list(shape)} {dtype} for this array: {exc}", name
            ) from None

    def _read_item(
        self, read: _ArrayRead, span: za.ChunkSpan | None, entry: ChunkEntry | None, progress: Progress | None
    ) -> None:
        """Read one chunk of an array (its ``zarr.json`` checked first, once), then copy it to the device.

        Chunks wholly inside the rows are read straight into the tensor; a chunk that straddles
        the edge is read whole (its checksum covers all of it) and the overlap copied.
        """
        separator = read.separator(self.check_metadata)
        if span is None or entry is None:
            return  # an array without chunks to read: its zarr.json is all there is to check
        key = chunk_key(self.step, read.name, span.index, separator)
        lo, hi = read.lo, read.hi
        if lo <= span.start and span.stop <= hi:
            self._read_chunk(key, read.bytes[span.start - lo : span.stop - lo], span.pad, entry, progress)
        else:
            self._read_overlap(key, span, entry, read.bytes, lo, hi, progress)
        read.to_device(max(lo, span.start) - lo, min(hi, span.stop) - lo)

    def _read_overlap(
        self,
        key: str,
        span: za.ChunkSpan,
        entry: ChunkEntry,
        data: memoryview,
        lo: int,
        hi: int,
        progress: Progress | None,
    ) -> None:
        try:
            whole = bytearray(span.stop - span.start)
        except MemoryError:
            raise self._error(
                LimitExceededError, f"cannot allocate {span.stop - span.start} bytes for a chunk", key
            ) from None
        self._read_chunk(key, memoryview(whole), span.pad, entry, progress)
        a, b = max(lo, span.start), min(hi, span.stop)
        data[a - lo : b - lo] = whole[a - span.start : b - span.start]

    def _read_chunk(self, key: str, out: memoryview, pad: int, entry: ChunkEntry, progress: Progress | None) -> None:
        crc = bytearray(za.CRC.size)
        padding = bytearray(pad)
        try:
            self.storage.read_into(key, [out, memoryview(padding), memoryview(crc)] if pad else [out, memoryview(crc)])
        except FileNotFoundError:
            raise self._error(MissingDataError, "chunk is missing", key) from None
        except TruncatedDataError as exc:
            raise self._error(TruncatedDataError, str(exc).split(" [", 1)[0], key) from None
        za.verify_chunk(out, padding, bytes(crc), entry.crc32c, url=self.storage.url, step=self.step, key=key)
        if progress is not None:
            progress(out.nbytes)

    def nbytes(self) -> int:
        """Bytes of every array the manifest lists (an array of unknown dtype counts 0)."""
        return sum(_nbytes(r) for r in self.arrays.values())

    def verify(self, progress: Progress | None = None) -> list[Fault]:
        """Decode every state tree and re-read every chunk; return every fault found (empty when sound)."""
        faults: list[Fault] = []
        for key, obj in self.manifest.objects.items():
            for ref in tensor_refs(obj.tree):
                if ref not in self.arrays:
                    faults.append(
                        Fault(key, "manifest", f"state references array {ref!r} that the manifest does not list")
                    )
            try:
                decode(obj.tree, _Placeholders(), key, url=self.storage.url, step=self.step)
            except CorruptSnapshotError as exc:
                faults.append(Fault(key, type(exc).__name__, str(exc)))
        faults.extend(self._group_faults())
        for window in self._windows(VERIFY_WINDOW_BYTES):
            try:
                self.read_arrays(window, progress)
                continue
            except _READ_FAULTS:
                pass
            for name in window:  # find every fault of the window, one array at a time
                try:
                    self.read_array(name)
                except _READ_FAULTS as exc:
                    faults.append(Fault(getattr(exc, "key", None) or name, type(exc).__name__, str(exc)))
        return faults

    def _group_faults(self) -> list[Fault]:
        """The zarr group documents must be intact for plain zarr to open the snapshot."""
        expected = {group_key(self.step): za.group_metadata(group_attributes(self.step, self.manifest.format_version))}
        for group in sorted({name.split("/", 1)[0] for name in self.arrays}):
            expected[group_key(self.step, group)] = za.group_metadata()
        faults = []
        for key, document in expected.items():
            try:
                if json.loads(self.storage.read_record(key)) != json.loads(document):
                    faults.append(
                        Fault(key, "ManifestMismatchError", "zarr group metadata differs from what was written")
                    )
            except FileNotFoundError:
                faults.append(Fault(key, "MissingDataError", "zarr group metadata is missing"))
            except (ValueError, RecursionError) as exc:
                faults.append(Fault(key, "CorruptSnapshotError", f"zarr group metadata is not JSON: {exc}"))
        return faults

    def _windows(self, limit: int) -> Iterator[list[str]]:
        """Array names in groups of about ``limit`` bytes, so verification memory stays bounded."""
        window: list[str] = []
        size = 0
        for name, record in self.arrays.items():
            window.append(name)
            size += _nbytes(record)
            if size >= limit:
                yield window
                window, size = [], 0
        if window:
            yield window


VERIFY_WINDOW_BYTES = 256 << 20
_READ_FAULTS = (CorruptSnapshotError, StorageError, FileNotFoundError, ValueError)


class _Placeholders(Mapping[str, torch.Tensor]):
    """An empty tensor for every array name, so verification decodes state trees without reading arrays."""

    def __getitem__(self, name: str) -> torch.Tensor:
        return torch.empty(0)

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


def _nbytes(record: ArrayRecord) -> int:
    """An array's logical size in bytes, or 0 for a dtype this reader does not know (it reports that)."""
    try:
        return math.prod(record.shape) * from_name(record.dtype).itemsize
    except MoaiCkptError:
        return 0
