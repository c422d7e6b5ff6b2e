"""Writing and reading one snapshot directory, with every check on the way back in.

`SnapshotWriter` writes a rank's chunks straight from tensor memory, then its rank index; the
coordinator writes the group metadata and manifest, waits for every rank, and writes the commit
marker last. `SnapshotReader` trusts nothing it has not checked: the marker's own checksum and
version, the manifest's and rank indexes' sha256 against the marker, each array's record by
arithmetic (dtype, chunk grid, bytes under a limit) before any list or tensor is built from it,
each array's whole ``zarr.json`` against the manifest, chunk coverage against the rank indexes,
and every chunk's crc32c.
"""

from __future__ import annotations

import json
import math
import platform
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Executor, Future, wait
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from moai_ckpt import arrays as za
from moai_ckpt import faults
from moai_ckpt._version import __version__
from moai_ckpt.dtypes import StoredDtype, from_name, torch_dtype
from moai_ckpt.errors import (
    CorruptSnapshotError,
    LimitExceededError,
    ManifestMismatchError,
    MissingDataError,
    MoaiCkptError,
    SnapshotExistsError,
    SnapshotNotFoundError,
    StorageError,
    TruncatedDataError,
)
from moai_ckpt.format import (
    FORMAT_VERSION,
    ArrayRecord,
    ChunkEntry,
    CommitBody,
    CommitMarker,
    Manifest,
    RankIndex,
    RankRef,
    load_commit,
    load_record,
    sha256,
)
from moai_ckpt.layout import (
    array_metadata_key,
    chunk_key,
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


@contextmanager
def settle(futures: list[Future[Any]]) -> Iterator[None]:
    """On an error, cancel what has not started and wait for what has, then re-raise.

    No write of a failed save may land after the failure is reported (a retry of the same
    step would race with it).
    """
    try:
        yield
    except BaseException:
        for f in futures:
            f.cancel()
        wait(futures)
        raise


def group_attributes(step: int, version: int = FORMAT_VERSION) -> dict[str, Any]:
    return {za.MOAI_ATTR: {"format_version": version, "step": step}}


@dataclass
class SnapshotWriter:
    """Writes the parts of a snapshot at ``step``; one per rank, the coordinator also commits."""

    storage: Storage
    executor: Executor
    step: int
    #: the writer's fence (`moai_ckpt.lease.RunLease.check`): called before every chunk, and with
    #: ``remote=True`` right before the commit marker; it raises once this writer lost the run
    fence: Callable[..., None] | None = None

    def write_chunks(
        self,
        jobs: list[tuple[str, za.ChunkSpan, memoryview]],
        *,
        rank: int = 0,
        world_size: int = 1,
        device_type: str = "cpu",
        progress: Progress | None = None,
    ) -> RankIndex:
        """Write this rank's chunks (array name, span, bytes), then its rank index, then make them durable."""
        futures = [
            (name, self.executor.submit(self._write_chunk, chunk_key(self.step, name, span.key), span, data, progress))
            for name, span, data in jobs
        ]
        chunks: dict[str, list[ChunkEntry]] = {}
        written = 0
        with settle([f for _, f in futures]):
            for name, fut in futures:
                entry = fut.result()
                chunks.setdefault(name, []).append(entry)
                written += entry.nbytes
        index = RankIndex(
            step=self.step,
            rank=rank,
            world_size=world_size,
            chunks=chunks,
            bytes_written=written,
            device_type=device_type,
        )
        key = rank_index_key(self.step, rank)
        self.storage.write(key, index.model_dump_json().encode())
        # each rank makes its own writes durable before it votes: the commit need not list them
        self.storage.barrier([key, *(chunk_key(self.step, name, span.key) for name, span, _ in jobs)])
        return index

    def _write_chunk(self, key: str, span: za.ChunkSpan, data: memoryview, progress: Progress | None) -> ChunkEntry:
        faults.point("snapshot.persist")
        if self.fence is not None:
            self.fence()  # a writer stopped past its lease writes no more chunks once it resumes
        pad = bytes(span.pad)
        crc = za.chunk_crc(data, pad)
        self.storage.write(key, [data, pad, za.CRC.pack(crc)] if pad else [data, za.CRC.pack(crc)])
        if progress is not None:
            progress(data.nbytes)
        return ChunkEntry(index=span.index, nbytes=span.encoded_size, crc32c=crc)

    def write_metadata(self, manifest: Manifest) -> bytes:
        """Coordinator: write every array's and group's ``zarr.json`` and the manifest; returns its bytes."""
        groups = {name.split("/", 1)[0] for name in manifest.arrays}
        attrs = group_attributes(self.step, manifest.format_version)
        data = manifest.model_dump_json(indent=1).encode()
        documents = {
            array_metadata_key(self.step, name): json.dumps(
                za.array_metadata(rec, from_name(rec.dtype)), indent=1
            ).encode()
            for name, rec in manifest.arrays.items()
        }
        documents[group_key(self.step)] = za.group_metadata(attrs)
        documents |= {group_key(self.step, g): za.group_metadata() for g in sorted(groups)}
        documents[manifest_key(self.step)] = data
        writes = [self.executor.submit(self.storage.write, key, doc) for key, doc in documents.items()]
        with settle(writes):
            for w in writes:
                w.result()
        self.storage.barrier(list(documents))
        return data

    def commit(
        self, manifest_bytes: bytes, manifest: Manifest, indexes: list[RankIndex], writer: dict[str, str]
    ) -> CommitMarker:
        """Coordinator: write the commit marker last (every writer made its parts durable already)."""
        refs = []
        for index in sorted(indexes, key=lambda i: i.rank):
            key = rank_index_key(self.step, index.rank)
            stored = self.storage.read_record(key)
            # vouch only for what parses back to what the rank reported: a torn write is not committed
            if load_record(RankIndex, stored, url=self.storage.url, step=self.step, key=key) != index:
                raise CorruptSnapshotError(
                    "rank index reads back different from what was written",
                    url=self.storage.url,
                    step=self.step,
                    key=key,
                )
            refs.append(RankRef(rank=index.rank, key=key, sha256=sha256(stored)))
        body = CommitBody(
            step=self.step,
            created=manifest.created,
            manifest_sha256=sha256(manifest_bytes),
            ranks=refs,
            world_size=manifest.world_size,
            total_bytes=sum(i.bytes_written for i in indexes),
            array_count=len(manifest.arrays),
            device_types=manifest.device_types,
            writer=writer,
        )
        marker = CommitMarker.seal(body)
        faults.point("snapshot.commit")
        marker_key = commit_key(self.step)
        if self.fence is not None:
            self.fence(remote=True)  # still the run's writer, right before vouching for the step
        try:
            self.storage.create(marker_key, marker.to_bytes())  # never over another writer's marker
        except FileExistsError:
            raise SnapshotExistsError(
                "another writer committed this step while it was being written; this save is not committed",
                url=self.storage.url,
                step=self.step,
                key=marker_key,
            ) from None
        self.storage.barrier([marker_key])
        return marker


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
                    f"{record.path}/{span.key}",
                )
            if entry.nbytes != span.encoded_size:
                raise self._error(
                    ManifestMismatchError,
                    f"rank index records {entry.nbytes} bytes, the manifest implies {span.encoded_size}",
                    f"{record.path}/{span.key}",
                )
            out.append((span, entry))
        return out

    def check_metadata(self, record: ArrayRecord) -> None:
        """Check the record's layout, then its whole ``zarr.json`` against what the record implies."""
        self._layout(record)
        key = array_metadata_key(self.step, record.path)
        try:
            raw = self.storage.read_record(key)
        except FileNotFoundError:
            raise self._error(MissingDataError, "array is missing (no zarr.json)", record.path) from None
        za.check_array_metadata(raw, record, url=self.storage.url, step=self.step, key=key)

    def read_array(self, name: str, progress: Progress | None = None) -> torch.Tensor:
        """Read one array into a new CPU tensor, checking metadata, coverage and every crc32c."""
        return self.read_arrays([name], progress)[name]

    def _start_array(
        self, name: str, progress: Progress | None, rows: tuple[int, int] | None = None
    ) -> tuple[torch.Tensor, list[Future[None]]]:
        """Check chunk coverage, allocate the tensor (``rows`` of dimension 0, or all), queue its reads.

        Chunks wholly inside the rows are read straight into the tensor; a chunk that straddles
        the edge is read whole (its checksum covers all of it) and the overlap copied.
        """
        record = self.arrays[name]
        spans = self._spans(record)
        itemsize = from_name(record.dtype).itemsize
        total_rows = record.shape[0] if record.shape else 1
        first, last = rows if rows is not None else (0, total_rows)
        if not 0 <= first <= last <= total_rows:
            raise self._error(ManifestMismatchError, f"rows {first}..{last} outside 0..{total_rows}", name)
        shape = (last - first, *record.shape[1:]) if record.shape else ()
        out = self._allocate(name, shape, record.dtype)
        data = za.tensor_bytes(out)
        row_bytes = math.prod(record.shape[1:]) * itemsize if record.shape else itemsize
        lo, hi = first * row_bytes, last * row_bytes
        futures = []
        for span, entry in spans:
            if span.stop <= lo or span.start >= hi:
                continue
            key = chunk_key(self.step, name, span.key)
            if lo <= span.start and span.stop <= hi:
                target = data[span.start - lo : span.stop - lo]
                futures.append(self.executor.submit(self._read_chunk, key, target, span.pad, entry, progress))
            else:
                futures.append(self.executor.submit(self._read_overlap, key, span, entry, data, lo, hi, progress))
        return out, futures

    def _allocate(self, name: str, shape: tuple[int, ...], dtype: str) -> torch.Tensor:
        """An uninitialised CPU tensor; the layout check bounded its size, the host may still refuse it."""
        try:
            return torch.empty(shape, dtype=torch_dtype(dtype))
        except (RuntimeError, MemoryError) as exc:
            raise self._error(
                LimitExceededError, f"cannot allocate {list(shape)} {dtype} for this array: {exc}", name
            ) from None

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

    def read_arrays(
        self,
        names: Iterable[str] | None = None,
        progress: Progress | None = None,
        rows: dict[str, tuple[int, int]] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Read many arrays (or ``rows`` of them) with all their chunk reads in flight at once."""
        names = list(self.arrays) if names is None else list(names)
        for name in names:
            if name not in self.arrays:
                raise self._error(ManifestMismatchError, "state references an array the manifest does not list", name)
        checks = [self.executor.submit(self.check_metadata, self.arrays[name]) for name in names]
        with settle(checks):
            for f in checks:
                f.result()
        out: dict[str, torch.Tensor] = {}
        pending: list[Future[None]] = []
        with settle(pending):
            for name in names:
                out[name], futures = self._start_array(name, progress, (rows or {}).get(name))
                pending.extend(futures)
            for f in pending:
                f.result()
        return out

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


def writer_info() -> dict[str, str]:
    return {
        "moai_ckpt": __version__,
        "torch": torch.__version__,
        "host": platform.node(),
        "python": platform.python_version(),
    }


def manifest_for(
    step: int,
    created: str,
    objects: dict[str, Any],
    records: dict[str, ArrayRecord],
    *,
    world_size: int,
    device_types: list[str],
    info: dict[str, Any] | None = None,
) -> Manifest:
    return Manifest(
        step=step,
        created=created,
        objects=objects,
        arrays=records,
        world_size=world_size,
        device_types=device_types,
        info=info or {},
    )
