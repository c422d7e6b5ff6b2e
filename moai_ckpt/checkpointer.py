"""`Checkpointer`: the public face of the snapshots of one run directory.

It checks arguments, coordinates saves in flight, and hands each operation to the collaborator
that owns it: `moai_ckpt.catalog` lists and opens snapshots, `moai_ckpt.staging` and
`moai_ckpt.commit` save one (the commit protocol, phase by phase), `moai_ckpt.restore` loads one,
`moai_ckpt.verify` checks one, `moai_ckpt.pruner` prunes (by `moai_ckpt.retention` policies), and
`moai_ckpt.writer` holds the run for this process. Each save and restore emits an event
(`moai_ckpt.events`), which the run's writer also keeps in the run's history (`moai_ckpt.eventlog`).
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any, TypeVar

from moai_ckpt.catalog import SnapshotCatalog
from moai_ckpt.commit import SnapshotCommit, copy_snapshot
from moai_ckpt.distributed import World, agree, current_world
from moai_ckpt.errors import InvalidArgumentError, MoaiCkptError, redact_url
from moai_ckpt.eventlog import EventHistory
from moai_ckpt.events import Event, EventHook, EventSink
from moai_ckpt.format import CommitMarker, Manifest
from moai_ckpt.iopool import IOPool
from moai_ckpt.options import CheckpointerOptions, valid_info, valid_step
from moai_ckpt.overlap import OverlapStager
from moai_ckpt.persist import ProcessCommit, WriterProcess, shareable
from moai_ckpt.pruner import PrunePlan, Pruner
from moai_ckpt.restore import SnapshotRestore
from moai_ckpt.results import RestoreInfo, SaveHandle, SnapshotEntry, VerifyReport
from moai_ckpt.retention import MetricSource, policies_of
from moai_ckpt.snapshot import Progress, SnapshotReader
from moai_ckpt.staging import HostPool, Staged, Stager, reserve, stage
from moai_ckpt.storage import RetryPolicy, Storage, open_storage
from moai_ckpt.verify import verify as verify_snapshot
from moai_ckpt.writer import RunWriter

__all__ = ["Checkpointer", "CheckpointerOptions"]

log = logging.getLogger("moai_ckpt")
T = TypeVar("T")


class Checkpointer:
    """Snapshots of training state in one run directory on any fsspec storage.

    Args:
        url: the run directory: a local path, or any fsspec URL (``memory://``, ``s3://``...).
        options: a `CheckpointerOptions`; keyword options below override its fields.
        process_group: under torch.distributed, a gloo group spanning all ranks to coordinate
            over (by default one is created; every rank must build its Checkpointer together).
        local: this process alone, even under torch.distributed: no collectives (for tools that
            list, inspect or verify a run from one rank).
        keep: retention policies applied after each commit (`moai_ckpt.retention`): an int N
            keeps the last N, or a policy, or a list of them (any keeps); None keeps everything.
        on_event: a hook (or several) called with the `moai_ckpt.events.Event` of each save,
            save_async and restore of this Checkpointer (after those of `moai_ckpt.events.add_hook`).
        **storage_options: any `CheckpointerOptions` field (``collective_timeout_s=60``);
            everything else goes to the fsspec file system (e.g. ``endpoint_url``), or
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
        keep: Any = None,
        process_group: Any | None = None,
        local: bool = False,
        on_event: EventHook | Iterable[EventHook] | None = None,
        **storage_options: Any,
    ) -> None:
        named = {
            "chunk_bytes": chunk_bytes,
            "io_threads": io_threads,
            "capture_rng": capture_rng,
            "retry": retry,
            "keep": keep,
        }
        self.options, storage_options = CheckpointerOptions.merged(options, named, storage_options)
        self.storage: Storage = open_storage(url, self.options.retry, **storage_options)
        self._opened = (url, storage_options)  # how a writer process opens the same run directory
        self.storage.record_limit = self.options.max_record_bytes
        self.url = self.storage.url
        self.world: World = current_world(
            timedelta(seconds=self.options.collective_timeout_s), process_group, local=local
        )
        self._executor = IOPool(self.options.io_threads)
        self._background = ThreadPoolExecutor(1, thread_name_prefix="moai-save")
        self._pool = HostPool()
        self._pool.shared_limit = self.options.shm_limit_bytes
        self._stager = OverlapStager(self._pool)
        self._inflight: SaveHandle | None = None
        self._process: WriterProcess | None = None  # the writer process of save_async (persist="process")
        self._thread_only: str | None = None  # why save_async persists in a thread although asked otherwise
        #: the snapshots of this run directory
        self.catalog = SnapshotCatalog(self.storage, self._executor, max_array_bytes=self.options.max_array_bytes)
        #: this process as the run's writer: its lease (the coordinator's, once it writes), its saves
        self.writer = RunWriter(self.storage, self.options.lease_ttl_s)
        self._restore = SnapshotRestore(self.catalog, self.world, capture_rng=self.options.capture_rng)
        self._pruner = Pruner(self.catalog, self.writer, leftover_grace_s=self.options.leftover_grace_s)
        #: what ``run.json`` records about the training function (set by `fault_tolerant`)
        self.run_entry: dict[str, Any] | None = None
        #: what the last `restore` loaded: its step, and which rank's copy of rank-local state
        self.last_restore: RestoreInfo | None = None
        self._history = EventHistory(self.storage, self.world.rank)
        #: where this run directory's events go: logging, hooks, the run's history
        self.events = EventSink(self.url, self.world.rank, on_event, store=self._keep_event)

    # -- listing -------------------------------------------------------------------------------

    def scan(self) -> list[SnapshotEntry]:
        """Every snapshot directory with its status, oldest first (committed or not)."""
        return self.catalog.scan()

    def steps(self) -> list[int]:
        """Steps of committed snapshots, oldest first (including ones of a newer format version)."""
        return self.catalog.steps()

    def latest_step(self) -> int | None:
        """The newest committed step (reads markers newest first and stops at the first valid one)."""
        return self.catalog.latest_step()

    def damaged_after(self, step: int | None) -> list[SnapshotEntry]:
        """Snapshots newer than ``step`` (all, for None) whose commit marker is there but damaged.

        A damaged marker means "not committed", so restores pass over them; their files may still
        be there, and this says which were passed over and why (`SnapshotEntry.problem`).
        """
        return self.catalog.damaged_after(step)

    def open_snapshot(self, step: int | None = None) -> SnapshotReader:
        """Open a committed snapshot (the latest by default), its marker, manifest and rank indexes checked."""
        return self.catalog.open(self.catalog.resolve(step))

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
            InvalidArgumentError: ``step`` is not an integer in [0, 1e12) (nothing is written).
        """
        step, info = self._save_arguments(step, info)
        self._settle_inflight()
        started = time.perf_counter()
        try:
            staged = self._located(step, lambda: self._stage(step, state, info))
            with self.writer.writing(step):
                marker = self._commit().run(staged, overwrite=overwrite, progress=progress)
        except Exception as exc:
            self.events.failed("save", step, started, exc, stall_s=time.perf_counter() - started)
            raise
        took = time.perf_counter() - started
        self.events.emit("save", step, took, bytes=marker.body.total_bytes, stall_s=took)
        self._retain()
        log.info(
            "saved step %d to %s: %d arrays, %.1f MB in %.2f s",
            step,
            redact_url(self.url),
            marker.body.array_count,
            marker.body.total_bytes / 1e6,
            time.perf_counter() - started,
        )
        return marker

    def save_async(
        self,
        step: int,
        state: Mapping[str, Any],
        *,
        if_busy: str = "wait",
        overwrite: bool = False,
        info: Mapping[str, Any] | None = None,
        progress: Progress | None = None,
    ) -> SaveHandle | None:
        """Snapshot ``state`` at ``step``, blocking only while its copies to host memory are queued.

        CPU tensors are copied before this returns. The copies of CUDA tensors are queued and run
        while training goes on (`moai_ckpt.overlap`): those of the parameters and optimizer state
        on a side stream that any optimizer's next step waits for (on the device), the others on
        the current stream. Encoding, checksums, writes and the commit run in the background:
        with ``persist="process"`` in the writer process (`start_writer`), fed through shared
        memory, so that this process's interpreter stays free for training; otherwise (and until
        that process is up) in a thread. The returned handle gives the commit marker
        (`SaveHandle.result`) or the error.
        Changes made to the state after this returns do not reach the snapshot; a tracked CUDA
        tensor written in place outside an optimizer step before `wait_staged` fails the snapshot
        with `StagingRaceError` rather than let a torn copy through. At most one save is in
        flight per Checkpointer.

        Args:
            if_busy: when the previous save is still writing, ``"wait"`` for it or ``"skip"`` this
                one with a warning (returns None; single process only: every rank must agree).
            overwrite: replace a committed snapshot at ``step`` (as in `save`).

        Raises:
            Exception: the error of an earlier background save that nobody has looked at yet.
        """
        step, info = self._save_arguments(step, info)
        if if_busy not in ("wait", "skip"):
            raise InvalidArgumentError(f"if_busy must be 'wait' or 'skip', got {if_busy!r}")
        if if_busy == "skip" and self.world.world_size > 1:
            raise InvalidArgumentError("if_busy='skip' needs every rank to agree; use 'wait' under torch.distributed")
        previous = self._inflight
        if if_busy == "skip" and previous is not None and not previous.done():
            warnings.warn(f"save of step {step} skipped: step {previous.step} is still being written", stacklevel=2)
            return None
        called = time.perf_counter()  # the event's stall counts the wait for the previous save too
        self._settle_inflight()
        started = time.perf_counter()
        process = self._process if self.start_writer() else None
        self._pool.shared = process is not None
        try:
            try:
                self._stager.begin(step, state)
                staged = self._located(step, lambda: self._stage(step, state, info, copy=self._stager))
            except OSError as exc:
                if process is None or isinstance(exc, MoaiCkptError):
                    raise
                self._fall_back(f"the state does not fit in shared memory ({exc})")
                process, self._pool.shared = None, False
                self._stager.begin(step, state)
                staged = self._located(step, lambda: self._stage(step, state, info, copy=self._stager))
        except Exception as exc:
            self.events.failed("save_async", step, called, exc, stall_s=time.perf_counter() - called)
            raise
        copies = self._stager.pending
        assert copies is not None
        stall = time.perf_counter() - started
        blocked = time.perf_counter() - called
        writing = self.writer.writing(step)
        writing.__enter__()
        commit = self._commit(process)

        def persist() -> CommitMarker:
            persisting = time.perf_counter()
            try:
                copies.finish(staged, self._pool, self.url)
                marker = commit.run(staged, overwrite=overwrite, progress=progress)
            except Exception as exc:
                self.writer.failed(step, exc)
                self.events.failed("save_async", step, called, exc, stall_s=blocked)
                raise
            finally:
                writing.__exit__(None, None, None)
            done = time.perf_counter()
            self.events.emit(
                "save_async",
                step,
                done - called,
                bytes=marker.body.total_bytes,
                stall_s=blocked,
                persist_s=done - persisting,
            )
            self._retain()
            return marker

        handle = SaveHandle(step, self._background.submit(persist), stall, "thread" if process is None else "process")
        self._inflight = handle
        return handle

    def wait_staged(self) -> None:
        """Block until the copies of the save in flight reached host memory.

        Call it before writing a tracked CUDA tensor in place outside an optimizer step (a manual
        update, a tensor of a plain dict), right after `save_async`; optimizer steps wait by
        themselves, on the device.
        """
        copies = self._stager.pending
        if copies is not None and not copies.done:
            copies.wait()

    def guard_staged(self) -> None:
        """The training thread reached a point where tracked tensors may be written (a step
        boundary of a `Run`): the current streams wait for the copies in flight, on the device,
        and a tracked tensor already changed under them fails that snapshot."""
        self._stager.guard()

    def prepare(self, state: Mapping[str, Any]) -> None:
        """Start allocating the pinned host buffers ``state``'s CUDA tensors will be staged in,
        in the background (a first `save_async` would otherwise clone them on the device, or wait)."""
        reserve(state, pool=self._pool, rank=self.world.rank)

    def _stage(self, step: int, state: Mapping[str, Any], info: dict[str, Any], copy: Stager | None = None) -> Staged:
        """Phase 1 of a save (`moai_ckpt.staging.stage`), on the caller's thread."""
        return stage(
            step,
            state,
            info,
            rank=self.world.rank,
            world_size=self.world.world_size,
            capture_rng=self.options.capture_rng,
            pool=self._pool,
            copy=copy,
        )

    def _commit(self, process: WriterProcess | None = None) -> SnapshotCommit:
        """Phases 2 to 6 of a save (`moai_ckpt.commit`), over this run's storage as it is now;
        written by the writer ``process`` when one is given (`moai_ckpt.persist`)."""
        args = (self.storage, self.world, self._executor, self.writer)
        if process is not None:
            return ProcessCommit(
                *args, chunk_bytes=self.options.chunk_bytes, run_entry=self.run_entry, process=process, pool=self._pool
            )
        return SnapshotCommit(*args, chunk_bytes=self.options.chunk_bytes, run_entry=self.run_entry)

    # -- the writer process of save_async --------------------------------------------------------

    def start_writer(self, wait: float = 0.0) -> bool:
        """Start the writer process of `save_async` in the background (``persist="process"``), if
        it is not started yet; returns whether it is ready to take a save.

        `save_async` calls this itself (its saves take the thread path until the process is up,
        which takes seconds: it imports torch); `fault_tolerant` calls it when it starts. Where the
        process cannot be used (``memory://`` storage, storage options that are not plain data, a
        process that fails to start or dies, a state larger than ``/dev/shm``) saves persist in a
        thread, after one logged warning.

        Args:
            wait: seconds to wait for the process to be ready.
        """
        if self.options.persist != "process" or self._thread_only is not None:
            return False
        if self._process is None:
            url, storage_options = self._opened
            why = shareable(url, storage_options)
            if why is not None:
                self._fall_back(why)
                return False
            try:
                self._process = WriterProcess(
                    url,
                    storage_options,
                    self.options.retry.model_dump(mode="json"),
                    self.options.max_record_bytes,
                    self.options.io_threads,
                )
            except OSError as exc:  # no /dev/shm to share buffers through
                self._fall_back(f"no shared memory: {exc}")
                return False
            self._process.start()
        return self._process.ready(wait)

    @property
    def writer_pid(self) -> int | None:
        """The process id of the writer process of `save_async`, once started (None before, or without one)."""
        return self._process.pid if self._process is not None else None

    def _fall_back(self, why: str) -> None:
        """From now on, save_async persists in a thread (logged once)."""
        self._thread_only = why
        log.warning("save_async of %s persists in a thread, not a writer process: %s", redact_url(self.url), why)
        process, self._process = self._process, None
        if process is not None:
            process.close()
        self._pool.shared = False

    def _save_arguments(self, step: object, info: Mapping[str, Any] | None) -> tuple[int, dict[str, Any]]:
        """The step and info of a save, checked before anything is written."""
        checked = self._located(None, lambda: valid_step(step))
        return checked, self._located(checked, lambda: valid_info(info))

    def _located(self, step: int | None, fn: Callable[[], T]) -> T:
        """``fn()``, its moai-ckpt errors naming this run's URL and ``step``."""
        try:
            return fn()
        except MoaiCkptError as exc:
            located = exc.located(url=self.url, step=step)
            if located is exc:
                raise
            raise located from None

    def _settle_inflight(self) -> None:
        """Wait for the save in flight; raise its error if nobody has seen it yet."""
        previous, self._inflight = self._inflight, None
        if previous is None:
            return
        previous.wait()
        error = previous.exception()
        if error is not None and not previous.observed:
            previous.observed = True
            raise error

    # -- the run's writer ------------------------------------------------------------------------

    def acquire(self) -> None:
        """Take the run's writer lease now (collective; the coordinator, rank 0, holds it).

        Saves take it themselves; call this to fail fast, before a long restore and replay, when
        another job writes the run. See docs/security.md, "Writers and fencing".

        Raises:
            RunLockedError: another live writer holds the run (named in the message).
        """
        agree(
            self.world,
            "taking the run's writer lease",
            lambda: self.writer.hold() if self.world.rank == 0 else None,
            url=self.url,
        )

    def check_writer(self) -> None:
        """Raise `LeaseLostError` if this process took the run's writer lease and no longer holds it.

        A local check (no storage request), cheap enough before every log segment.
        """
        self.writer.check()

    def copy_snapshot(self, source: Checkpointer, step: int, *, progress: Progress | None = None) -> None:
        """Copy the committed snapshot at ``step`` of ``source`` into this run, fenced as a save is.

        This process takes the run's writer lease and the step's claim, writes every object, then
        the commit marker last (created exclusively, after the lease is checked again), and
        verifies the copy; a copy that fails verification (the source changed meanwhile) is
        removed. Readers never see a mix: a snapshot already at ``step`` is un-committed first.
        ``progress`` is called with the bytes of each object copied.

        Raises:
            FencingError: another writer holds this run or the step.
            CorruptSnapshotError: the copy does not verify.
        """
        copy_snapshot(source.storage, self.storage, self.writer, valid_step(step), self.verify, progress)

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
        in the mapping; dicts and lists are updated in place. Modules may be wrapped (DDP,
        ``torch.compile``, ...) differently from when they were saved. Of state whose ranks held
        different values (rank-local), each rank gets its own copy on the world size that saved,
        rank 0's on any other; `last_restore` says which (and the choice is logged).

        Args:
            state: the objects to restore, keyed as they were saved (a subset is fine).
            step: the step to restore; the latest committed one by default.
            fallback: if the chosen snapshot is corrupt, try older committed ones, newest first,
                and warn which one was used.
            restore_rng: restore the global RNG states (default: the ``capture_rng`` option).

        Raises:
            SnapshotNotFoundError: no committed snapshot (at ``step``).
            CorruptSnapshotError: the snapshot fails a check (names URL, step and key).
            StateMismatchError: the snapshot does not fit the objects (names, types, shapes, dtypes).
            InvalidArgumentError: ``state`` is not a mapping, or ``step`` not an integer in [0, 1e12).
        """
        if not isinstance(state, MutableMapping):
            raise InvalidArgumentError(f"state must be a dict of named objects, got {type(state).__name__}")
        self.wait_staged()  # the restore writes into the objects a save in flight may still be copying
        started, moved = time.perf_counter(), list[int]()

        def counted(nbytes: int) -> None:
            moved.append(nbytes)  # atomic: the I/O threads report concurrently
            if progress is not None:
                progress(nbytes)

        try:
            info = self._restore.run(state, step, fallback=fallback, restore_rng=restore_rng, progress=counted)
        except Exception as exc:
            took = time.perf_counter() - started
            self.events.failed("restore", step or 0, started, exc, stall_s=took, bytes=sum(moved))
            raise
        self.last_restore = info
        took = time.perf_counter() - started
        self.events.emit("restore", info.step, took, bytes=sum(moved), stall_s=took)
        return info.step

    def _keep_event(self, event: Event) -> None:
        """Keep ``event`` in the run's history if this process is the run's writer (holds its lease)."""
        if self.world.rank == 0 and self.writer.lease is not None:
            self._history.append(event)

    # -- integrity and housekeeping ------------------------------------------------------------

    def verify(self, step: int | None = None, *, progress: Progress | None = None) -> VerifyReport:
        """Re-read every chunk of a snapshot and check every checksum and record.

        Verifying the newest committed snapshot also reports newer snapshots that are not
        committed because their marker is damaged (a restore passes over them, so they are lost).

        Returns a report listing every fault (``report.ok`` is True when there are none).
        """
        return verify_snapshot(self.catalog, step, progress)

    def prune(self, keep: Any = 1, *, dry_run: bool = False) -> list[int]:
        """Delete the committed snapshots no retention policy keeps, and leftovers of failed saves.

        ``keep`` is an int N (the newest N), a policy of `moai_ckpt.retention` or a list of them
        (a snapshot any of them keeps is kept). Never deletes the newest committed snapshot, nor
        one this process is writing, nor an uncommitted one newer than the latest commit that
        changed within ``leftover_grace_s`` or that another live writer claimed (it may be a save
        in progress elsewhere). Returns the steps deleted. Snapshots only: the op-stream logs of a
        `fault_tolerant` run go with them through `moai_ckpt.pruning.prune_run` (what
        ``moai-ckpt prune`` runs).

        Raises:
            InvalidArgumentError: ``keep`` is no policy, or a `KeepBest` metric no snapshot has.
        """
        return self.prune_report(keep, dry_run=dry_run).deleted

    def prune_report(
        self,
        keep: Any = 1,
        *,
        dry_run: bool = False,
        protect: Mapping[int, str] | None = None,
        metrics: MetricSource | None = None,
    ) -> PrunePlan:
        """`prune`, returning every snapshot folder with what happened to it and why.

        Args:
            protect: steps kept whatever the policies say, with the reason.
            metrics: where `KeepBest` reads its values (default: the numbers in each manifest's info).
        """
        policies = self._located(None, lambda: policies_of(keep))
        return self._located(
            None, lambda: self._pruner.prune(policies, dry_run=dry_run, protect=protect, metrics=metrics)
        )

    def _retain(self) -> None:
        """After a commit, the coordinator applies the ``keep`` policies; a failure only warns."""
        if not self.options.keep or self.world.rank != 0:
            return
        try:
            self._pruner.prune(self.options.keep)
        except (MoaiCkptError, OSError) as exc:
            log.warning("pruning %s after a commit failed (nothing else is affected): %s", redact_url(self.url), exc)

    def wait(self) -> CommitMarker | None:
        """Wait for the save in flight, if any; returns its marker (raises its error)."""
        handle, self._inflight = self._inflight, None
        return handle.result() if handle is not None else None

    def close(self) -> None:
        """Finish the save in flight (raising its unseen error), then release threads and buffers."""
        try:
            self._settle_inflight()
        finally:
            self._background.shutdown(wait=True)
            if self._process is not None:
                self._process.close()
            self._executor.shutdown(wait=True)
            self._stager.close()
            self._pool.clear()
            self.world.close()
            self.writer.close()  # the last Checkpointer of the run in this process releases its lease

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpointer({self.url!r})"
