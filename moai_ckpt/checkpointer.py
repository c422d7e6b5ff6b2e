"""`Checkpointer`: the public face of snapshots on one run directory."""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from collections.abc import Mapping, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from moai_ckpt.capture import RNG_KEY, Restorer, capture
from moai_ckpt.errors import (
    CorruptSnapshotError,
    MoaiCkptError,
    SnapshotExistsError,
    SnapshotNotFoundError,
    UnsupportedFormatError,
)
from moai_ckpt.format import (
    COMMIT,
    SNAPSHOTS,
    CommitMarker,
    Manifest,
    load_commit,
    now_iso,
    parse_snapshot_dir,
    snapshot_dir,
)
from moai_ckpt.rng import GlobalRNG
from moai_ckpt.snapshot import (
    Fault,
    Progress,
    SnapshotReader,
    SnapshotWriter,
    array_record,
    host_tensor,
    manifest_for,
    writer_info,
)
from moai_ckpt.storage import LocalStorage, RetryPolicy, Storage, open_storage
from moai_ckpt.tree import tensor_refs

log = logging.getLogger("moai_ckpt")


_LISTED = ("committed", "unsupported")


class CheckpointerOptions(BaseModel):
    """Validated options of a `Checkpointer`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    chunk_bytes: int = Field(default=64 << 20, ge=1, description="largest chunk of a stored array")
    io_threads: int = Field(default=8, ge=1, le=256, description="parallel storage operations")
    capture_rng: bool = Field(default=True, description="save and restore every global RNG with the state")
    leftover_grace_s: float = Field(
        default=600.0,
        ge=0,
        description="prune leaves uncommitted snapshots newer than the latest commit alone this long",
    )
    retry: RetryPolicy = Field(default_factory=RetryPolicy)


@dataclass(frozen=True)
class SnapshotEntry:
    """One directory under ``snapshots/`` and what its commit marker says."""

    step: int
    status: str  # committed | uncommitted | invalid | unsupported
    marker: CommitMarker | None = None
    problem: str | None = None


@dataclass
class VerifyReport:
    """The result of `Checkpointer.verify`."""

    url: str
    step: int
    faults: list[Fault] = field(default_factory=list)
    arrays: int = 0
    bytes_checked: int = 0  # bytes of chunks that were read and passed their checksums

    @property
    def ok(self) -> bool:
        return not self.faults

    def raise_if_failed(self) -> None:
        if self.faults:
            first = self.faults[0]
            raise CorruptSnapshotError(
                f"{len(self.faults)} fault(s), first: {first.message}", url=self.url, step=self.step, key=first.key
            )


class Checkpointer:
    """Snapshots of training state in one run directory on any fsspec storage.

    Args:
        url: the run directory: a local path, or any fsspec URL (``memory://``, ``s3://``...).
        options: a `CheckpointerOptions`; keyword options below override its fields.
        **storage_options: passed to the fsspec file system (e.g. ``endpoint_url``), or
            ``fsync=False`` for a local path on a scratch disk.

    Example::

        ckpt = Checkpointer("s3://bucket/run-7")
        ckpt.save(step, {"model": model, "optim": opt, "extra": {"tokens_seen": n}})
        step = ckpt.restore({"model": model, "optim": opt, "extra": {}})
    """

    def __init__(
        self,
        url: str,
        *,
        options: CheckpointerOptions | None = None,
        chunk_bytes: int | None = None,
        io_threads: int | None = None,
        capture_rng: bool | None = None,
        retry: RetryPolicy | None = None,
        **storage_options: Any,
    ) -> None:
        overrides = {
            k: v
            for k, v in {
                "chunk_bytes": chunk_bytes,
                "io_threads": io_threads,
                "capture_rng": capture_rng,
                "retry": retry,
            }.items()
            if v is not None
        }
        base = options or CheckpointerOptions()
        self.options = CheckpointerOptions.model_validate({**dict(base), **overrides}) if overrides else base
        self.storage: Storage = open_storage(url, self.options.retry, **storage_options)
        self.url = self.storage.url
        self._executor = ThreadPoolExecutor(self.options.io_threads, thread_name_prefix="moai-io")
        self._writing: set[int] = set()
        self._lock = threading.Lock()

    # -- listing -------------------------------------------------------------------------------

    def scan(self) -> list[SnapshotEntry]:
        """Every snapshot directory with its status, oldest first (committed or not)."""
        return [self._entry(step) for step in self._listed_steps()]

    def _listed_steps(self) -> list[int]:
        names = self.storage.list_dirs(SNAPSHOTS)
        return sorted(s for s in map(parse_snapshot_dir, names) if s is not None)

    def _entry(self, step: int) -> SnapshotEntry:
        try:
            data = self.storage.read(f"{snapshot_dir(step)}/{COMMIT}")
        except FileNotFoundError:
            return SnapshotEntry(step, "uncommitted")
        try:
            return SnapshotEntry(step, "committed", load_commit(data, url=self.url, step=step))
        except UnsupportedFormatError as exc:
            return SnapshotEntry(step, "unsupported", problem=str(exc))
        except CorruptSnapshotError as exc:
            return SnapshotEntry(step, "invalid", problem=str(exc))

    def steps(self) -> list[int]:
        """Steps of committed snapshots, oldest first (including ones of a newer format version)."""
        return [e.step for e in self.scan() if e.status in _LISTED]

    def latest_step(self) -> int | None:
        """The newest committed step (reads markers newest first and stops at the first valid one)."""
        for step in reversed(self._listed_steps()):
            if self._entry(step).status in _LISTED:
                return step
        return None

    def open_snapshot(self, step: int | None = None) -> SnapshotReader:
        """Open a committed snapshot (the latest by default), its marker, manifest and rank indexes checked."""
        return self._reader(self._resolve(step))

    def manifest(self, step: int | None = None) -> Manifest:
        """The validated manifest of a committed snapshot."""
        return self.open_snapshot(step).manifest

    def marker(self, step: int | None = None) -> CommitMarker:
        """The validated commit marker of a committed snapshot."""
        return self.open_snapshot(step).marker

    # -- save ----------------------------------------------------------------------------------

    def save(
        self,
        step: int,
        state: Mapping[str, Any],
        *,
        overwrite: bool = False,
        info: Mapping[str, Any] | None = None,
        progress: Progress | None = None,
    ) -> CommitMarker:
        """Write a snapshot of ``state`` at ``step`` and commit it; returns the commit marker.

        Raises:
            SnapshotExistsError: a committed snapshot exists at ``step`` and ``overwrite`` is off.
            UnserializableStateError: a value is neither a tensor nor JSON-able (names its key).
            StorageError: storage failed permanently or after retries; nothing is committed.
        """
        started = time.perf_counter()
        captured = capture(state, rng=GlobalRNG() if self.options.capture_rng else None)
        host = {name: host_tensor(t) for name, t in captured.tensors.items()}
        records = {name: array_record(name, t, self.options.chunk_bytes) for name, t in captured.tensors.items()}
        with self._lock:
            if step in self._writing:
                raise SnapshotExistsError("a save of this step is already in progress", url=self.url, step=step)
            self._writing.add(step)
        try:
            self._clear_for_write(step, overwrite)
            writer = SnapshotWriter(self.storage, self._executor, step)
            device_types = sorted(captured.devices) or ["cpu"]
            index = writer.write_arrays(records, host, device_type=device_types[0], progress=progress)
            manifest = manifest_for(
                step,
                now_iso(),
                captured.objects,
                records,
                world_size=1,
                device_types=device_types,
                info=dict(info or {}),
            )
            manifest_bytes = writer.write_groups(manifest)
            marker = writer.commit(manifest_bytes, manifest, [index], writer_info())
        finally:
            with self._lock:
                self._writing.discard(step)
        log.info(
            "saved step %d to %s: %d arrays, %.1f MB in %.2f s",
            step,
            self.url,
            len(records),
            marker.body.total_bytes / 1e6,
            time.perf_counter() - started,
        )
        return marker

    def _clear_for_write(self, step: int, overwrite: bool) -> None:
        prefix = snapshot_dir(step)
        existing = self.storage.list(prefix)
        if not existing:
            return
        commit_key = f"{prefix}/{COMMIT}"
        if commit_key in existing:
            if not overwrite:
                raise SnapshotExistsError(
                    "a committed snapshot exists at this step; pass overwrite=True to replace it",
                    url=self.url,
                    step=step,
                )
            self.storage.delete([commit_key])  # un-commit first: readers never see a mix
        self.storage.delete_prefix(prefix)

    # -- restore -------------------------------------------------------------------------------

    def restore(
        self,
        state: MutableMapping[str, Any],
        step: int | None = None,
        *,
        fallback: bool = False,
        restore_rng: bool | None = None,
        progress: Progress | None = None,
    ) -> int:
        """Load a committed snapshot into ``state``'s objects in place; returns its step.

        Everything is read and checked before anything is loaded: on any error the objects are
        untouched. Entries of ``state`` that hold plain values (numbers, strings) are replaced
        in the mapping; dicts and lists are updated in place.

        Args:
            state: the objects to restore, keyed as they were saved (a subset is fine).
            step: the step to restore; the latest committed one by default.
            fallback: if the chosen snapshot is corrupt, try older committed ones, newest first,
                and warn which one was used.
            restore_rng: restore the global RNG states (default: the ``capture_rng`` option).

        Raises:
            SnapshotNotFoundError: no committed snapshot (at ``step``).
            CorruptSnapshotError: the snapshot fails a check (names URL, step and key).
            StateMismatchError: the snapshot does not fit the objects (names, shapes).
        """
        candidates = [self._resolve(step)]
        if fallback and step is None:
            candidates += [s for s in reversed(self.steps()) if s != candidates[0]]
        errors: list[str] = []
        for candidate in candidates:
            try:
                self._restore_step(candidate, state, restore_rng, progress)
            except (CorruptSnapshotError, UnsupportedFormatError, SnapshotNotFoundError) as exc:
                if not fallback:
                    raise
                errors.append(f"step {candidate}: {exc}")
                log.warning("snapshot at step %d is unusable, trying an older one: %s", candidate, exc)
                continue
            if errors:
                warnings.warn(
                    f"restored step {candidate} from {self.url} instead of newer corrupt snapshot(s): "
                    + "; ".join(errors),
                    stacklevel=2,
                )
            return candidate
        raise CorruptSnapshotError("no committed snapshot could be restored: " + "; ".join(errors), url=self.url)

    def _restore_step(
        self, step: int, state: MutableMapping[str, Any], restore_rng: bool | None, progress: Progress | None
    ) -> None:
        reader = self._reader(step)
        wanted = dict(state)
        rng = self.options.capture_rng if restore_rng is None else restore_rng
        if rng and RNG_KEY in reader.manifest.objects:
            wanted[RNG_KEY] = GlobalRNG()
        names = sorted(
            {
                ref
                for key in wanted
                if key in reader.manifest.objects
                for ref in tensor_refs(reader.manifest.objects[key].tree)
            }
        )
        tensors = reader.read_arrays(names, progress)
        restorer = Restorer(reader.manifest.objects, tensors, url=self.url, step=step)
        restorer.check(wanted)
        restorer.apply(wanted)
        for key in state:
            state[key] = wanted[key]

    def _resolve(self, step: int | None) -> int:
        if step is not None:
            return step
        latest = self.latest_step()
        if latest is None:
            raise SnapshotNotFoundError("no committed snapshot in this run directory", url=self.url)
        return latest

    def _reader(self, step: int) -> SnapshotReader:
        return SnapshotReader(self.storage, step, self._executor)

    # -- integrity and housekeeping ------------------------------------------------------------

    def verify(self, step: int | None = None, *, progress: Progress | None = None) -> VerifyReport:
        """Re-read every chunk of a snapshot and check every checksum and record.

        Returns a report listing every fault (``report.ok`` is True when there are none).
        """
        step = self._resolve(step)
        report = VerifyReport(self.url, step)
        try:
            reader = self._reader(step)
        except (SnapshotNotFoundError, UnsupportedFormatError):
            raise
        except MoaiCkptError as exc:
            report.faults.append(Fault(exc.key or "", type(exc).__name__, str(exc)))
            return report
        report.arrays = len(reader.arrays)
        lock = threading.Lock()

        def count(nbytes: int) -> None:
            with lock:
                report.bytes_checked += nbytes
            if progress is not None:
                progress(nbytes)

        report.faults.extend(reader.verify(count))
        return report

    def prune(self, keep: int = 1, *, dry_run: bool = False) -> list[int]:
        """Delete all but the newest ``keep`` committed snapshots, and leftovers of failed saves.

        Never deletes the newest committed snapshot, nor one this process is writing, nor an
        uncommitted one newer than the latest commit that changed within ``leftover_grace_s``
        (it may be a save in progress elsewhere). Returns the steps deleted.
        """
        if keep < 1:
            raise ValueError("prune keeps at least the newest committed snapshot (keep >= 1)")
        entries = self.scan()
        committed = [e.step for e in entries if e.status == "committed"]
        latest = committed[-1] if committed else -1
        doomed = set(committed[:-keep]) if len(committed) > keep else set()
        with self._lock:
            busy = set(self._writing)
        for e in entries:
            if e.status not in ("uncommitted", "invalid"):
                continue
            if e.step < latest or self._idle_for(e.step) >= self.options.leftover_grace_s:
                doomed.add(e.step)
        doomed -= busy
        if not dry_run:
            for s in sorted(doomed):
                prefix = snapshot_dir(s)
                self.storage.delete([f"{prefix}/{COMMIT}"])  # un-commit first
                self.storage.delete_prefix(prefix)
                log.info("pruned step %d from %s", s, self.url)
        return sorted(doomed)

    def _idle_for(self, step: int) -> float:
        """Seconds since anything in an uncommitted snapshot changed.

        Known on local storage only; elsewhere 0, so such a directory is never taken for abandoned.
        """
        root = getattr(self.storage, "root", None)
        path = os.path.join(root, snapshot_dir(step)) if isinstance(self.storage, LocalStorage) and root else None
        if path is None or not os.path.isdir(path):
            return 0.0
        times = [os.stat(os.path.join(d, f)).st_mtime for d, _, files in os.walk(path) for f in files]
        return time.time() - max(times, default=os.stat(path).st_mtime)

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpointer({self.url!r})"
