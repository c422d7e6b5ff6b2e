"""Writing one snapshot directory: chunks straight from tensor memory, metadata, the commit marker.

`SnapshotWriter` writes a rank's chunks (its directories made once, top-down, then one job per I/O
thread over the list of chunks) and its rank index; the coordinator writes the zarr metadata and
the manifest, makes everything durable with one barrier, and creates the commit marker last.
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import torch

from moai_ckpt import arrays as za
from moai_ckpt import faults
from moai_ckpt._version import __version__
from moai_ckpt.dtypes import from_name
from moai_ckpt.errors import CorruptSnapshotError, SnapshotExistsError
from moai_ckpt.format import (
    ArrayRecord,
    ChunkEntry,
    CommitBody,
    CommitMarker,
    Manifest,
    RankIndex,
    RankRef,
    load_record,
    sha256,
)
from moai_ckpt.iopool import for_each
from moai_ckpt.layout import array_metadata_key, chunk_key, commit_key, group_key, manifest_key, rank_index_key
from moai_ckpt.snapshot import Progress, group_attributes
from moai_ckpt.storage import Storage


@dataclass
class SnapshotWriter:
    """Writes the parts of a snapshot at ``step``; one per rank, the coordinator also commits."""

    storage: Storage
    executor: Executor
    step: int
    #: the writer's fence (`moai_ckpt.lease.RunLease.check`): called before every chunk, and with
    #: ``remote=True`` right before the commit marker; it raises once this writer lost the run
    fence: Callable[..., None] | None = None
    #: written by this writer and not made durable yet (`write_metadata`'s barrier covers them)
    _unsynced: list[str] = field(default_factory=list)
    #: directories this writer made (or found) already
    _made: set[str] = field(default_factory=set)

    def write_chunks(
        self,
        jobs: list[tuple[str, za.ChunkSpan, memoryview]],
        *,
        rank: int = 0,
        world_size: int = 1,
        device_type: str = "cpu",
        progress: Progress | None = None,
        durable: bool = True,
    ) -> RankIndex:
        """Write this rank's chunks (array name, span, bytes), then its rank index.

        With ``durable`` they are made durable before this returns (a rank votes on durable
        writes); the coordinator passes False and `write_metadata` makes everything durable with
        one barrier before the commit marker.
        """
        keys = [chunk_key(self.step, name, span.index, za.CHUNK_SEPARATOR) for name, span, _ in jobs]
        index_key = rank_index_key(self.step, rank)
        self._make_dirs([*keys, index_key])
        entries = for_each(
            self.executor,
            [(key, span, data) for key, (_, span, data) in zip(keys, jobs, strict=True)],
            lambda job: self._write_chunk(*job, progress),
        )
        chunks: dict[str, list[ChunkEntry]] = {}
        for (name, _, _), entry in zip(jobs, entries, strict=True):
            chunks.setdefault(name, []).append(entry)
        index = RankIndex(
            step=self.step,
            rank=rank,
            world_size=world_size,
            chunks=chunks,
            bytes_written=sum(e.nbytes for e in entries),
            device_type=device_type,
        )
        self.storage.write(index_key, index.model_dump_json().encode())
        self._unsynced += [index_key, *keys]
        if durable:
            self.storage.barrier(self._unsynced)
            self._unsynced = []
        return index

    def _make_dirs(self, keys: list[str]) -> None:
        """Make the directories of ``keys`` that this writer has not made yet, top-down, once."""
        new = {k.rpartition("/")[0] for k in keys} - self._made
        if new:
            self.storage.make_dirs(new)
            self._made |= {d.rsplit("/", i)[0] for d in new for i in range(d.count("/") + 1)}

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
        """Coordinator: write every array's and group's ``zarr.json`` and the manifest; returns its bytes.

        Then one barrier makes them durable together with this writer's chunks and rank index.
        """
        groups = {name.split("/", 1)[0] for name in manifest.arrays}
        attrs = group_attributes(self.step, manifest.format_version)
        data = manifest.model_dump_json().encode()
        documents = {
            array_metadata_key(self.step, name): za.encode(za.array_metadata(rec, from_name(rec.dtype)))
            for name, rec in manifest.arrays.items()
        }
        documents[group_key(self.step)] = za.group_metadata(attrs)
        documents |= {group_key(self.step, g): za.group_metadata() for g in sorted(groups)}
        documents[manifest_key(self.step)] = data
        self._make_dirs(list(documents))
        for_each(self.executor, list(documents.items()), lambda item: self.storage.write(*item))
        self.storage.barrier([*self._unsynced, *documents])
        self._unsynced = []
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
