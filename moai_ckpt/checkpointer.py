"""`Checkpointer`: the public face of snapshots on one run directory."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import operator
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field

from moai_ckpt import faults
from moai_ckpt.arrays import ChunkSpan
from moai_ckpt.capture import RNG_KEY, Captured, PartialState, Restorer, capture, merge_partial
from moai_ckpt.digest import digest_tensors
from moai_ckpt.distributed import CoordinationError, RankLostError, World, current_world
from moai_ckpt.dtypes import from_name, stored_dtype
from moai_ckpt.errors import (
    CorruptSnapshotError,
    FencingError,
    InvalidArgumentError,
    MoaiCkptError,
    SnapshotExistsError,
    SnapshotNotFoundError,
    UnsafeEntryError,
    UnserializableStateError,
    UnsupportedFormatError,
    redact_url,
)
from moai_ckpt.format import (
    COMMIT,
    LOG,
    RUN_INFO,
    SNAPSHOTS,
    STEP_DIGITS,
    CommitMarker,
    Manifest,
    ObjectRecord,
    RankIndex,
    RunInfo,
    claim_key,
    load_commit,
    log_base_steps,
    log_dir,
    now_iso,
    parse_log_segment,
    snapshot_dir,
    snapshot_steps,
)
from moai_ckpt.lease import RunLease, attach, detach, live_lease, read_claim
from moai_ckpt.ranklocal import RankLocalChoice, choose, find_rank_local, split_pieces
from moai_ckpt.results import RestoreInfo, SaveHandle, SnapshotEntry, VerifyReport, skipped_message
from moai_ckpt.rng import GlobalRNG
from moai_ckpt.sharding import (
    Piece,
    WritePlan,
    is_dtensor,
    live_targets,
    local_bytes,
    local_piece,
    plan_writes,
)
from moai_ckpt.snapshot import (
    DEFAULT_MAX_ARRAY_BYTES,
    Fault,
    Progress,
    SnapshotReader,
    SnapshotWriter,
    host_tensor,
    manifest_for,
    writer_info,
)
from moai_ckpt.staging import HostPool, Staged, Stager
from moai_ckpt.storage import RetryPolicy, Storage, open_storage
from moai_ckpt.tree import MAX_DEPTH, json_depth, tensor_refs

log = logging.getLogger("moai_ckpt")
T = TypeVar("T")


_LISTED = ("committed", "unsupported")


def valid_step(step: object) -> int:
    """``step`` as a plain int in [0, 1e12), or `InvalidArgumentError` (checked before any I/O).

    Integer types other than ``int`` (numpy integers, 0-d integer tensors) are accepted; bools are not.
    """
    if isinstance(step, bool):
        raise InvalidArgumentError(f"step must be an integer, got the bool {step}")
    try:
        value = operator.index(step)  # type: ignore[arg-type]
    except TypeError:
        raise InvalidArgumentError(f"step must be an integer, got {type(step).__name__} {step!r:.40}") from None
    if not 0 <= value < 10**STEP_DIGITS:
        raise InvalidArgumentError(f"step must be in [0, 1e{STEP_DIGITS}), got {value}")
    return value


def _valid_info(info: Mapping[str, Any] | None) -> dict[str, Any]:
    """``info`` as a plain dict once it is strict JSON with string keys a manifest can hold."""
    if info is None:
        return {}
    if not isinstance(info, Mapping):
        raise UnserializableStateError(f"info must be a dict, got {type(info).__name__}", key="info")
    bad = [k for k in info if not isinstance(k, str)]
    if bad:
        raise UnserializableStateError(f"info keys must be strings, got {bad[0]!r}", key="info")
    try:
        json.dumps(info, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise UnserializableStateError(f"info is not strict JSON: {exc}", key="info") from None
    if json_depth(info) > MAX_DEPTH:
        raise UnserializableStateError(f"info is nested more than {MAX_DEPTH} levels deep", key="info")
    return dict(info)


def _device_of(t: torch.Tensor | None) -> torch.device | None:
    if not isinstance(t, torch.Tensor):  # a forged tree may reference an array where a value lives
        return None
    local = t.to_local() if hasattr(t, "to_local") else t
    return None if local.device.type == "meta" else local.device


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
    collective_timeout_s: float = Field(
        default=300.0, gt=0, description="bound on every collective of a distributed save or restore"
    )
    max_array_bytes: int = Field(
        default=DEFAULT_MAX_ARRAY_BYTES,
        ge=1,
        description="largest array a restore or verify allocates; larger records are refused before any allocation",
    )
    lease_ttl_s: float = Field(
        default=30.0,
        ge=0.5,
        le=3600,
        description="the writer's lease on the run lasts this long unless renewed (every third of it); "
        "another job may take the run over once it lapses",
    )
    max_record_bytes: int = Field(
        default=64 << 20,
        ge=4096,
        description="largest metadata object read (commit marker, manifest, rank index, zarr.json, run.json); "
        "a larger one is refused unread",
    )
    retry: RetryPolicy = Field(default_factory=RetryPolicy)


class Checkpointer:
    """Snapshots of training state in one run directory on any fsspec storage.

    Args:
        url: the run directory: a local path, or any fsspec URL (``memory://``, ``s3://``...).
        options: a `CheckpointerOptions`; keyword options below override its fields.
        process_group: under torch.distributed, a gloo group spanning all ranks to coordinate
            over (by default one is created; every rank must build its Checkpointer together).
        local: this process alone, even under torch.distributed: no collectives (for tools that
            list, inspect or verify a run from one rank).
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
        process_group: Any | None = None,
        local: bool = False,
        **storage_options: Any,
    ) -> None:
        named = {"chunk_bytes": chunk_bytes, "io_threads": io_threads, "capture_rng": capture_rng, "retry": retry}
        overrides = {k: v for k, v in named.items() if v is not None}
        # keyword arguments that are option fields set options; the rest go to the storage back end
        overrides |= {k: storage_options.pop(k) for k in list(storage_options) if k in CheckpointerOptions.model_fields}
        base = options or CheckpointerOptions()
        self.options = CheckpointerOptions.model_validate({**dict(base), **overrides}) if overrides else base
        self.storage: Storage = open_storage(url, self.options.retry, **storage_options)
        self.storage.record_limit = self.options.max_record_bytes
        self.url = self.storage.url
        self._executor = ThreadPoolExecutor(self.options.io_threads, thread_name_prefix="moai-io")
        self.world: World = current_world(
            timedelta(seconds=self.options.collective_timeout_s), process_group, local=local
        )
        self._writing: set[int] = set()
        self._lock = threading.Lock()
        self._pool = HostPool()
        self._background = ThreadPoolExecutor(1, thread_name_prefix="moai-save")
        self._inflight: SaveHandle | None = None
        self._lease: RunLease | None = None  # the run's writer lease (the coordinator's, once it writes)
        #: what ``run.json`` records about the training function (set by `fault_tolerant`)
        self.run_entry: dict[str, Any] | None = None
        #: what the last `restore` loaded: its step, and which rank's copy of rank-local state
        self.last_restore: RestoreInfo | None = None

    # -- listing -------------------------------------------------------------------------------

    def scan(self) -> list[SnapshotEntry]:
        """Every snapshot directory with its status, oldest first (committed or not)."""
        return [self._entry(step) for step in self._listed_steps()]

    def _listed_steps(self) -> list[int]:
        return snapshot_steps(self.storage.list_dirs(SNAPSHOTS), self.url)

    def _entry(self, step: int) -> SnapshotEntry:
        try:
            # bounded, and refused at once if it is a link, a FIFO or a device
            data = self.storage.read_record(f"{snapshot_dir(step)}/{COMMIT}")
            return SnapshotEntry(step, "committed", load_commit(data, url=self.url, step=step))
        except FileNotFoundError:
            return SnapshotEntry(step, "uncommitted")
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
            InvalidArgumentError: ``step`` is not an integer in [0, 1e12) (nothing is written).
        """
        step, info = self._save_arguments(step, info)
        self._settle_inflight()
        started = time.perf_counter()
        staged = self._located(step, lambda: self._stage(step, state, info))
        with self._claim(step):
            marker = self._persist(staged, overwrite=overwrite, progress=progress)
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
        """Snapshot ``state`` at ``step``, blocking only while its tensors are copied to host memory.

        Encoding, checksums, writes and the commit run in a background thread; the returned handle
        gives the commit marker (`SaveHandle.result`) or the error. Changes made to the state after
        this returns do not reach the snapshot. At most one save is in flight per Checkpointer.

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
        self._settle_inflight()
        started = time.perf_counter()
        staged = self._located(step, lambda: self._stage(step, state, info, copy=self._pool))
        stall = time.perf_counter() - started
        claim = self._claim(step)
        claim.__enter__()

        def persist() -> CommitMarker:
            try:
                return self._persist(staged, overwrite=overwrite, progress=progress)
            except Exception as exc:
                self._drop_claim(step, exc)
                raise
            finally:
                claim.__exit__(None, None, None)

        handle = SaveHandle(step, self._background.submit(persist), stall)
        self._inflight = handle
        return handle

    def _save_arguments(self, step: object, info: Mapping[str, Any] | None) -> tuple[int, dict[str, Any]]:
        """The step and info of a save, checked before anything is written."""
        checked = self._located(None, lambda: valid_step(step))
        return checked, self._located(checked, lambda: _valid_info(info))

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

    @contextmanager
    def _claim(self, step: int) -> Iterator[None]:
        """Mark ``step`` as being written by this process (prune leaves it alone)."""
        with self._lock:
            if step in self._writing:
                raise SnapshotExistsError("a save of this step is already in progress", url=self.url, step=step)
            self._writing.add(step)
        try:
            yield
        except Exception as exc:
            self._drop_claim(step, exc)
            raise
        finally:
            with self._lock:
                self._writing.discard(step)

    def _drop_claim(self, step: int, error: Exception) -> None:
        """After a failed save, give up this writer's storage claim on ``step`` (if it made one):
        its leftovers are then plain leftovers. A writer fenced off touches nothing more."""
        if self._lease is not None and not isinstance(error, FencingError):
            self._lease.forget_claim(step)

    # -- the run's writer ------------------------------------------------------------------------

    def acquire(self) -> None:
        """Take the run's writer lease now (collective; the coordinator, rank 0, holds it).

        Saves take it themselves; call this to fail fast, before a long restore and replay, when
        another job writes the run. See docs/security.md, "Writers and fencing".

        Raises:
            RunLockedError: another live writer holds the run (named in the message).
        """
        self._agree("taking the run's writer lease", lambda: self._writer_lease() if self.world.rank == 0 else None)

    def check_writer(self) -> None:
        """Raise `LeaseLostError` if this process took the run's writer lease and no longer holds it.

        A local check (no storage request), cheap enough before every log segment.
        """
        if self._lease is not None:
            self._lease.check()

    def _writer_lease(self) -> RunLease:
        """The run's lease, held (coordinator only)."""
        if self._lease is None:
            self._lease = attach(self.storage, self.options.lease_ttl_s)
        self._lease.acquire()
        return self._lease

    def _prepare_write(self, step: int, overwrite: bool) -> None:
        """Coordinator, before any rank writes: hold the run, claim the step, clear leftovers."""
        lease = self._writer_lease()
        self._refuse_or_clear_marker(step, overwrite)
        lease.claim(step)  # from here no other writer touches this step
        self._clear_for_write(step, overwrite)

    def _refuse_or_clear_marker(self, step: int, overwrite: bool) -> None:
        """Refuse to write over a commit marker (valid or damaged) unless ``overwrite``.

        A link or special file where the step's directory belongs is no snapshot: it is removed
        (the entry itself; a link is never followed) so the step can be written.
        """
        prefix = snapshot_dir(step)
        try:
            marked = self.storage.exists(f"{prefix}/{COMMIT}")
        except UnsafeEntryError as exc:
            if exc.key != prefix:
                marked = True  # a link or FIFO as the marker: not ours to ignore
            else:
                log.warning("removing %s from %s: %s", prefix, self.url, exc)
                self.storage.delete_tree(prefix)
                marked = False
        if marked and not overwrite:
            raise SnapshotExistsError(
                "a commit marker exists at this step (a committed snapshot, or a damaged one: see "
                "`moai-ckpt list --all`); pass overwrite=True to replace it",
                url=self.url,
                step=step,
            )

    def _rng_key(self, rank: int) -> str:
        return RNG_KEY if rank == 0 else f"{RNG_KEY}.{rank}"

    def _stage(
        self, step: int, state: Mapping[str, Any], info: Mapping[str, Any] | None, copy: Stager | None = None
    ) -> Staged:
        """Capture ``state`` on this rank: its pieces of every array, as contiguous host tensors.

        With ``copy`` every host tensor is a copy (for a save that returns before it writes).
        Otherwise CPU tensors are written straight from the live memory, and device tensors go
        through the pinned staging pool: all copies queued, one wait.
        """
        faults.point("snapshot.stage")
        rng_key = self._rng_key(self.world.rank)
        captured = capture(state, rng=GlobalRNG() if self.options.capture_rng else None, rng_key=rng_key)
        staged = Staged(step=step, objects=captured.objects, info=dict(info or {}), rng_key=rng_key)
        pooled = False
        for name, tensor in captured.tensors.items():
            shape, start, stop, local = local_piece(tensor)
            staged.pieces[name] = Piece(stored_dtype(tensor.dtype, key=name).logical, shape, start, stop)
            staged.devices[name] = str(tensor.device)
            if copy is not None:
                staged.host[name] = copy(name, local)
            elif local.device.type == "cuda":
                staged.host[name], pooled = self._pool(name, local), True
            else:
                staged.host[name] = host_tensor(local)
        if self.world.world_size > 1:
            self._start_digests(captured, staged)
        if copy is not None:
            copy.wait()
        elif pooled:
            self._pool.wait()
        return staged

    def _start_digests(self, captured: Captured, staged: Staged) -> None:
        """Choose the tensors taken as replicated (not DTensors, not this rank's RNG state), whose
        digests the ranks compare, and queue the digests of those on a device (read in `_persist`)."""
        own = set(tensor_refs(captured.objects[staged.rng_key].tree)) if staged.rng_key in captured.objects else set()
        staged.compare = [n for n, t in captured.tensors.items() if n not in own and not is_dtensor(t)]
        on_device = [(n, captured.tensors[n]) for n in staged.compare if captured.tensors[n].device.type != "cpu"]
        staged.device_digests = digest_tensors(on_device)

    def _digests(self, staged: Staged) -> dict[str, str]:
        """Array -> an exact digest of this rank's copy (with its dtype and shape), for the arrays
        taken as replicated. CPU tensors are digested from their host copies here (off the
        training thread for `save_async`); device tensors' digests were queued by `_stage`."""
        if not staged.compare:
            return {}
        on_host = [(n, staged.host[n]) for n in staged.compare if staged.devices[n] == "cpu"]
        found = digest_tensors(on_host).wait()
        if staged.device_digests is not None:
            found |= staged.device_digests.wait()
        return {n: f"{staged.pieces[n].dtype}{list(staged.pieces[n].shape)}:{found[n]}" for n in staged.compare}

    def _persist(self, staged: Staged, *, overwrite: bool = False, progress: Progress | None = None) -> CommitMarker:
        """Plan, write this rank's chunks, vote, and (coordinator) commit. Collective."""
        world, step = self.world, staged.step
        mine = {
            "pieces": {n: p.to_json() for n, p in staged.pieces.items()},
            "devices": staged.devices,
            "rng": staged.objects[staged.rng_key].model_dump(mode="json") if staged.rng_key in staged.objects else None,
            # each rank holds some entries of a partial object: the snapshot records their union
            "partial": {k: r.tree for k, r in staged.objects.items() if r.kind == "partial"},
            # "replicated" is checked: tensors whose ranks' digests differ are stored per rank
            "digests": self._digests(staged),
        }
        everyone = world.all_gather_json(mine, f"save of step {step}: planning")
        devices = {n: d for rank in everyone for n, d in rank["devices"].items()}
        pieces = [{n: Piece.from_json(p) for n, p in rank["pieces"].items()} for rank in everyone]
        rank_local = find_rank_local(pieces, [rank["digests"] for rank in everyone])
        for name, copies in rank_local.items():
            devices |= {path: everyone[rank]["devices"][name] for rank, path in copies.items()}
        if rank_local and world.rank == 0:
            log.info("step %d: %d array(s) differ between ranks and are stored per rank", step, len(rank_local))
        plan = plan_writes(split_pieces(pieces, rank_local), self.options.chunk_bytes, devices)
        # the coordinator takes the run's lease, claims the step and clears leftovers of an
        # interrupted save there (or refuses to overwrite), before any rank writes a byte
        self._agree(
            f"save of step {step}: preparing",
            lambda: self._prepare_write(step, overwrite) if world.rank == 0 else None,
            step,
        )
        fence = self._lease.check if world.rank == 0 and self._lease is not None else None
        writer = SnapshotWriter(self.storage, self._executor, step, fence)
        device_type = sorted({d.split(":")[0] for d in staged.devices.values()} or {"cpu"})[0]
        index = self._agree(
            f"save of step {step}: writing",
            lambda: writer.write_chunks(
                self._jobs(plan, staged, rank_local),
                rank=world.rank,
                world_size=world.world_size,
                device_type=device_type,
                progress=progress,
            ),
            step,
        )
        indexes = world.all_gather_json(index.model_dump(mode="json"), f"save of step {step}: collecting indexes")
        objects = dict(staged.objects)
        for rank, sent in enumerate(everyone):
            if rank > 0 and sent["rng"] is not None:
                objects[self._rng_key(rank)] = ObjectRecord.model_validate(sent["rng"])
        for key, record in staged.objects.items():
            if record.kind == "partial":
                merged = merge_partial([sent["partial"].get(key) for sent in everyone])
                objects[key] = record.model_copy(update={"tree": merged})

        def commit() -> CommitMarker | None:
            if world.rank != 0:
                return None
            self._ensure_run_info()
            manifest = manifest_for(
                step,
                now_iso(),
                objects,
                plan.records,
                world_size=world.world_size,
                device_types=sorted({d.split(":")[0] for d in devices.values()} or {"cpu"}),
                info=staged.info,
            )
            if rank_local:
                manifest = Manifest.model_validate({**manifest.model_dump(), "rank_local": rank_local})
            manifest_bytes = writer.write_metadata(manifest)
            marker = writer.commit(
                manifest_bytes, manifest, [RankIndex.model_validate(i) for i in indexes], writer_info()
            )
            if self._lease is not None:
                self._lease.forget_claim(step)
            return marker

        marker = self._agree(f"save of step {step}: committing", commit, step)
        sealed = world.broadcast_json(marker.to_json() if marker is not None else None, f"save of step {step}: done")
        return CommitMarker.model_validate(sealed)

    def _ensure_run_info(self) -> None:
        """Write ``run.json`` (the run's identity) with the first snapshot of a run directory."""
        try:
            if self.storage.exists(RUN_INFO):
                return
        except UnsafeEntryError:
            return  # a link or FIFO named run.json: left alone, never written through
        info = RunInfo(
            run_id=uuid.uuid4().hex,
            created=now_iso(),
            entrypoint=(self.run_entry or {}).get("function"),  # never sys.argv: it may hold secrets
            entry=self.run_entry,
            versions=writer_info(),
        )
        with contextlib.suppress(FileExistsError):  # written once, by whoever comes first
            self.storage.create(RUN_INFO, info.model_dump_json(indent=1).encode())

    def _jobs(
        self, plan: WritePlan, staged: Staged, rank_local: Mapping[str, Mapping[int, str]]
    ) -> list[tuple[str, ChunkSpan, memoryview]]:
        """This rank's chunks to write: (array, span, bytes); a rank-local copy's from its tensor."""
        tensor_of = {copies[self.world.rank]: name for name, copies in rank_local.items() if self.world.rank in copies}
        jobs = []
        for a in plan.for_rank(self.world.rank):
            record = plan.records[a.name]
            itemsize = from_name(record.dtype).itemsize
            row_bytes = math.prod(record.shape[1:]) * itemsize if record.shape else itemsize
            name = tensor_of.get(a.name, a.name)
            jobs.append((a.name, a.span, local_bytes(staged.host[name], staged.pieces[name], a.span, row_bytes)))
        return jobs

    def _agree(self, what: str, fn: Callable[[], T], step: int | None = None) -> T:
        """Run ``fn`` on every rank; if it fails anywhere, fail everywhere, naming the ranks.

        The failing rank raises its own error; the others raise `CoordinationError`.
        """
        try:
            result, error = fn(), None
        except Exception as exc:  # noqa: BLE001 - re-raised below, after every rank has heard of it
            result, error = None, exc
        if self.world.world_size > 1:
            self.world.barrier(what)  # names ranks that died or hung (on rank 0) instead of a bare socket error
            verdicts = self.world.all_gather_json(None if error is None else f"{type(error).__name__}: {error}", what)
            failed = {rank: msg for rank, msg in enumerate(verdicts) if msg}
            if failed and error is None:
                raise CoordinationError(
                    f"{what} failed on rank(s) {sorted(failed)}: "
                    + "; ".join(f"rank {r}: {m}" for r, m in sorted(failed.items())),
                    url=self.url,
                    step=step,
                )
        if error is not None:
            raise error
        return result  # type: ignore[return-value]

    def _clear_for_write(self, step: int, overwrite: bool) -> None:
        """Coordinator, holding the step's claim: remove what an interrupted save left there.

        Everything goes but the claim, whatever its names or kinds (a stray ``.nfs…`` file, a
        link, which is removed, never followed); a committed marker first, so readers never see
        a mix of two snapshots.
        """
        self._refuse_or_clear_marker(step, overwrite)  # again, under the claim
        prefix = snapshot_dir(step)
        self.storage.delete_tree(prefix, first=[f"{prefix}/{COMMIT}"], keep=[claim_key(step)])

    def copy_snapshot(self, source: Checkpointer, step: int) -> None:
        """Copy the committed snapshot at ``step`` of ``source`` into this run, fenced as a save is.

        This process takes the run's writer lease and the step's claim, writes every object, then
        the commit marker last (created exclusively, after the lease is checked again), and
        verifies the copy; a copy that fails verification (the source changed meanwhile) is
        removed. Readers never see a mix: a snapshot already at ``step`` is un-committed first.

        Raises:
            FencingError: another writer holds this run or the step.
            CorruptSnapshotError: the copy does not verify.
        """
        step = valid_step(step)
        self._prepare_write(step, overwrite=True)
        lease = self._lease
        assert lease is not None
        prefix, claim = snapshot_dir(step), claim_key(step)
        marker = f"{prefix}/{COMMIT}"
        try:
            keys = [k for k in source.storage.list(prefix) if k not in (marker, claim)]
            for key in keys:
                lease.check()
                self.storage.write(key, source.storage.read(key))
            self.storage.barrier(keys)
            lease.check(remote=True)
            self.storage.create(marker, source.storage.read_record(marker))
            self.storage.barrier([marker])
            report = self.verify(step)
            if not report.snapshot_ok:
                self.storage.delete_tree(prefix, first=[marker], keep=[claim])
                raise CorruptSnapshotError(
                    f"the copy fails verification ({len(report.faults)} fault(s), first: {report.faults[0].message})",
                    url=self.url,
                    step=step,
                )
        finally:
            lease.forget_claim(step)

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
        first = self._resolve(step)  # every rank lists; rank 0's answer is the one all use
        order = [first] + ([s for s in reversed(self.steps()) if s != first] if fallback and step is None else [])
        chosen = self.world.broadcast_json(order, "restore: choosing the step")
        errors: list[str] = []
        for candidate in chosen:

            def prepare(candidate: int = candidate) -> tuple[dict[str, Any], Restorer, RankLocalChoice]:
                return self._prepare(candidate, state, restore_rng, progress)

            try:
                prepared = self._agree(f"restore of step {candidate}", prepare, candidate)
            except (CorruptSnapshotError, UnsupportedFormatError, SnapshotNotFoundError, CoordinationError) as exc:
                if not fallback or isinstance(exc, RankLostError):
                    raise
                errors.append(f"step {candidate}: {exc}")
                log.warning("snapshot at step %d is unusable, trying an older one: %s", candidate, exc)
                continue
            wanted, restorer, rank_local = prepared
            restorer.apply(wanted)
            for key in state:
                state[key] = wanted[key]
            self.last_restore = RestoreInfo(self.url, candidate, rank_local)
            if rank_local.copies and self.world.rank == 0:
                log.log(
                    logging.INFO if rank_local.per_rank else logging.WARNING,
                    "restored step %d from %s: %s",
                    candidate,
                    self.url,
                    rank_local.describe(),
                )
            if errors:
                warnings.warn(
                    f"restored step {candidate} from {redact_url(self.url)} instead of newer corrupt snapshot(s): "
                    + "; ".join(errors),
                    stacklevel=2,
                )
            skipped = self.damaged_after(candidate) if step is None and self.world.rank == 0 else []
            if skipped:
                message = f"{self.url}: {skipped_message(skipped, candidate)}"
                log.warning("%s", message)
                warnings.warn(message, stacklevel=2)
            return candidate
        raise CorruptSnapshotError("no committed snapshot could be restored: " + "; ".join(errors), url=self.url)

    def _prepare(
        self, step: int, state: MutableMapping[str, Any], restore_rng: bool | None, progress: Progress | None
    ) -> tuple[dict[str, Any], Restorer, RankLocalChoice]:
        """Read and check everything this rank needs of ``step``; touch nothing yet.

        Of a rank-local array, the copy `moai_ckpt.ranklocal.choose` picks is read (this rank's
        own on the world size that saved, else the lowest rank's) and stands under the plain name.
        """
        reader = self._reader(step)
        manifest = reader.manifest
        wanted = dict(state)
        rng = self.options.capture_rng if restore_rng is None else restore_rng
        rng_key = self._rng_key(self.world.rank)
        records = dict(manifest.objects)
        if rng and rng_key in records:
            wanted[rng_key] = GlobalRNG()
        elif rng and RNG_KEY in records:
            log.warning(
                "snapshot has no RNG state for rank %d (saved with %d ranks); RNGs of this rank are not restored",
                self.world.rank,
                manifest.world_size,
            )
        for key, obj in wanted.items():
            record = records.get(key)
            if isinstance(obj, PartialState) and record is not None and isinstance(record.tree, dict):
                # only the entries this rank holds: another split of them is another read pattern
                held = obj.holds()
                tree = {e: record.tree[e] for e in held if e in record.tree}
                records[key] = record.model_copy(update={"tree": tree})
        names = sorted({ref for key in wanted if key in records for ref in tensor_refs(records[key].tree)})
        source, rank_local = choose(
            manifest.rank_local,
            set(names),
            saved_world_size=manifest.world_size,
            world_size=self.world.world_size,
            rank=self.world.rank,
        )
        arrays = {**manifest.arrays, **{name: manifest.arrays[path] for name, path in source.items()}}
        targets = live_targets(records, wanted, arrays)
        rows = {source.get(name, name): (t.start, t.stop) for name, t in targets.items()}
        raw = reader.read_arrays(sorted({source.get(name, name) for name in names}), progress, rows)
        tensors = {}
        for name in names:
            rows_read, target = raw[source.get(name, name)], targets.get(name)
            tensors[name] = (
                rows_read if target is None else target.wrap(rows_read, arrays[name].shape, _device_of(target.like))
            )
        restorer = Restorer(records, tensors, url=self.url, step=step)
        restorer.check(wanted)
        return wanted, restorer, rank_local

    def _resolve(self, step: int | None) -> int:
        if step is not None:
            return valid_step(step)
        latest = self.latest_step()
        if latest is None:
            raise SnapshotNotFoundError("no committed snapshot in this run directory", url=self.url)
        return latest

    def _reader(self, step: int) -> SnapshotReader:
        return SnapshotReader(self.storage, step, self._executor, max_array_bytes=self.options.max_array_bytes)

    def damaged_after(self, step: int | None) -> list[SnapshotEntry]:
        """Snapshots newer than ``step`` (all, for None) whose commit marker is there but damaged.

        A damaged marker means "not committed", so restores pass over them; their files may still
        be there, and this says which were passed over and why (`SnapshotEntry.problem`).
        """
        newer = [s for s in self._listed_steps() if step is None or s > step]
        return [e for e in map(self._entry, newer) if e.status == "invalid"]

    # -- integrity and housekeeping ------------------------------------------------------------

    def verify(self, step: int | None = None, *, progress: Progress | None = None) -> VerifyReport:
        """Re-read every chunk of a snapshot and check every checksum and record.

        Verifying the newest committed snapshot also reports newer snapshots that are not
        committed because their marker is damaged (a restore passes over them, so they are lost).

        Returns a report listing every fault (``report.ok`` is True when there are none).
        """
        latest = self.latest_step()
        step = self._resolve(step if step is not None else latest)
        report = VerifyReport(self.url, step)
        if step == latest:
            skipped = report.passed_over = self.damaged_after(step)
            if skipped:
                message = skipped_message(skipped, step)
                report.faults.extend(
                    Fault(f"{snapshot_dir(e.step)}/{COMMIT}", "CorruptSnapshotError", message) for e in skipped
                )
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
        doomed -= self._claimed_elsewhere(doomed - set(committed))
        if not dry_run:
            for s in sorted(doomed):
                prefix = snapshot_dir(s)
                # everything below is listed and checked first, then un-committed, then deleted
                self.storage.delete_tree(prefix, first=[f"{prefix}/{COMMIT}"])
                log.info("pruned step %d from %s", s, redact_url(self.url))
            kept = [s for s in committed if s not in doomed]
            if kept:
                self._prune_logs(kept[0])
        return sorted(doomed)

    def _claimed_elsewhere(self, steps: set[int]) -> set[int]:
        """Uncommitted steps that another process is writing: claimed under the run's live lease."""
        lease = live_lease(self.storage) if steps else None
        if lease is None or (self._lease is not None and lease.epoch == self._lease.epoch):
            return set()  # no live writer, or it is this process (its own saves are in `busy`)
        return {s for s in steps if (claim := read_claim(self.storage, s)) is not None and claim.epoch == lease.epoch}

    def _prune_logs(self, oldest_kept: int) -> None:
        """Delete the op-stream logs of snapshots older than ``oldest_kept``.

        Kept: the newest such log if it runs past ``oldest_kept`` further than any later log
        (a run that died after a snapshot committed, before its log moved over, has those
        records there alone).
        """
        last_steps: dict[int, int] = {}
        for base in log_base_steps(self.storage.list_dirs(LOG), self.url):
            names = [k.rsplit("/", 1)[-1] for k in self.storage.list(log_dir(base))]
            ends = [p[1] for p in map(parse_log_segment, names) if p is not None]
            last_steps[base] = max(ends, default=base)
        later_end = max((end for base, end in last_steps.items() if base >= oldest_kept), default=-1)
        older = sorted(b for b in last_steps if b < oldest_kept)
        for base in older:
            if base == older[-1] and last_steps[base] > max(later_end, oldest_kept):
                continue
            self.storage.delete_prefix(log_dir(base))
            log.info("pruned the log after step %d from %s", base, redact_url(self.url))

    def _idle_for(self, step: int) -> float:
        """Seconds since anything in an uncommitted snapshot changed.

        0 where the storage cannot tell, so such a directory is never taken for abandoned.
        """
        newest = self.storage.newest_change(snapshot_dir(step))
        return 0.0 if newest is None else max(time.time() - newest, 0.0)

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
            self._executor.shutdown(wait=True)
            self._pool.clear()
            self.world.close()
            lease, self._lease = self._lease, None
            if lease is not None:
                detach(lease)  # the last Checkpointer of the run in this process releases it

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpointer({self.url!r})"
