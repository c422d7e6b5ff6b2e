"""Committing a snapshot: the save protocol, run phase by phase on every rank at once.

A save of step S runs these phases, in this order, on every rank. Each phase that may fail on
one rank ends with a vote (`moai_ckpt.distributed.agree`): if it failed anywhere it fails
everywhere, and no rank goes on alone.

1. **stage** (`moai_ckpt.staging.stage`, on the caller's thread): capture the state and put this
   rank's piece of every tensor in host memory. `Checkpointer.save_async` returns after this
   phase, its device copies only queued (`moai_ckpt.overlap`); the others run in the background,
   after the copies are complete and checked.
2. **plan** (`SnapshotCommit.gather`, `SnapshotCommit.decide`): every rank sends its pieces, devices and replica digests
   (one all-gather); from them every rank computes the same `moai_ckpt.sharding.WritePlan`:
   which tensors differ between ranks and are stored per rank (`moai_ckpt.ranklocal`), the chunk
   grid of each array, and which rank writes each chunk.
3. **claim** (`SnapshotCommit.claim`): the coordinator (rank 0) takes the run's writer lease,
   refuses to write over a commit marker unless asked, claims S and clears what an interrupted
   save left there (`moai_ckpt.writer.RunWriter.prepare`). No rank writes a byte before.
4. **write** (`SnapshotCommit.write`): each rank writes its chunks straight from host memory,
   then its rank index (`moai_ckpt.snapshot_writer.SnapshotWriter`), and every rank but the
   coordinator makes them durable before it votes; the coordinator's writes are fenced by its
   lease, and made durable in phase 6.
5. **vote** (`SnapshotCommit.vote`): every rank votes on its writes; then the rank indexes and
   the parts of the state each rank holds alone (its RNG states, its entries of a partial
   object) are gathered.
6. **commit** (`SnapshotCommit.commit`): the coordinator writes ``run.json`` (with the run's
   first snapshot), the zarr metadata and the manifest, makes them and its own chunks and rank
   index durable with one barrier, checks its lease once more, and writes the commit marker
   last, by exclusive create (made durable too). From that moment the snapshot exists. The
   marker is broadcast, so every rank returns the same one.

A failure before phase 6 leaves leftovers only: invisible to readers, cleared by the next save of
S (phase 3) and deleted by prune (`moai_ckpt.retention`).
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from moai_ckpt.capture import merge_partial
from moai_ckpt.distributed import World, agree
from moai_ckpt.errors import CorruptSnapshotError, UnsafeEntryError
from moai_ckpt.format import CommitMarker, Manifest, ObjectRecord, RankIndex, RunInfo, now_iso
from moai_ckpt.layout import RUN_INFO, claim_key, commit_key, snapshot_dir
from moai_ckpt.ranklocal import find_rank_local, split_pieces
from moai_ckpt.results import VerifyReport
from moai_ckpt.sharding import Piece, WritePlan, plan_writes
from moai_ckpt.snapshot import Progress
from moai_ckpt.snapshot_writer import SnapshotWriter, manifest_for, writer_info
from moai_ckpt.staging import Staged, replica_digests, rng_key
from moai_ckpt.storage import Storage
from moai_ckpt.writer import RunWriter

log = logging.getLogger("moai_ckpt")


@dataclass
class Planned:
    """What phase 2 decided, the same on every rank."""

    plan: WritePlan
    #: tensor -> saving rank -> the array holding that rank's copy (tensors that differ between ranks)
    rank_local: dict[str, dict[int, str]]
    #: array -> the device its tensor lived on
    devices: dict[str, str]
    #: every rank's planning message (its RNG states and partial entries travel with it)
    messages: list[dict[str, Any]]


class SnapshotCommit:
    """Phases 2 to 6 of a save, on one rank (see the module docstring). One per save.

    Args:
        storage: the run directory.
        world: the ranks taking part.
        executor: runs the chunk writes.
        writer: this process as the run's writer (lease, claims).
        chunk_bytes: the largest chunk of a stored array.
        run_entry: what ``run.json`` records about the training function, if anything.
    """

    def __init__(
        self,
        storage: Storage,
        world: World,
        executor: Executor,
        writer: RunWriter,
        *,
        chunk_bytes: int,
        run_entry: dict[str, Any] | None = None,
    ) -> None:
        self.storage = storage
        self.world = world
        self.executor = executor
        self.writer = writer
        self.chunk_bytes = chunk_bytes
        self.run_entry = run_entry
        #: the writer of each step being saved: the write phase leaves its objects to the commit
        #: phase's one barrier, so both phases must use the same one
        self._snapshots: dict[int, SnapshotWriter] = {}

    def run(self, staged: Staged, *, overwrite: bool = False, progress: Progress | None = None) -> CommitMarker:
        """Commit ``staged`` (phases 2 to 6); returns the commit marker, the same on every rank."""
        step = staged.step
        planned = self.decide(staged, self.gather(staged))
        self.claim(step, overwrite)
        indexes = self.vote(step, lambda: self.write(planned, staged, progress))
        return self.seal(step, lambda: self.commit(planned, staged, indexes))

    # -- 2. plan ---------------------------------------------------------------------------------

    def gather(self, staged: Staged) -> list[dict[str, Any]]:
        """Every rank's planning message: its pieces, devices, RNG states, partial entries, digests."""
        mine = {
            "pieces": {n: p.to_json() for n, p in staged.pieces.items()},
            "devices": staged.devices,
            "rng": staged.objects[staged.rng_key].model_dump(mode="json") if staged.rng_key in staged.objects else None,
            # each rank holds some entries of a partial object: the snapshot records their union
            "partial": {k: r.tree for k, r in staged.objects.items() if r.kind == "partial"},
            # "replicated" is checked: tensors whose ranks' digests differ are stored per rank
            "digests": replica_digests(staged),
        }
        return self.world.all_gather_json(mine, f"save of step {staged.step}: planning")

    def decide(self, staged: Staged, everyone: list[dict[str, Any]]) -> Planned:
        """From every rank's message: the rank-local tensors, the chunks and who writes each."""
        devices = {n: d for rank in everyone for n, d in rank["devices"].items()}
        pieces = [{n: Piece.from_json(p) for n, p in rank["pieces"].items()} for rank in everyone]
        rank_local = find_rank_local(pieces, [rank["digests"] for rank in everyone])
        for name, copies in rank_local.items():
            devices |= {path: everyone[rank]["devices"][name] for rank, path in copies.items()}
        if rank_local and self.world.rank == 0:
            log.info("step %d: %d array(s) differ between ranks and are stored per rank", staged.step, len(rank_local))
        plan = plan_writes(split_pieces(pieces, rank_local), self.chunk_bytes, devices)
        return Planned(plan, rank_local, devices, everyone)

    # -- 3. claim --------------------------------------------------------------------------------

    def claim(self, step: int, overwrite: bool) -> None:
        """The coordinator holds the run, claims ``step`` and clears leftovers there (or refuses
        to overwrite), before any rank writes a byte."""
        agree(
            self.world,
            f"save of step {step}: preparing",
            lambda: self.writer.prepare(step, overwrite) if self.world.rank == 0 else None,
            url=self.storage.url,
            step=step,
        )

    def fence(self) -> Callable[..., None] | None:
        """The coordinator's writes are fenced by its lease; the other ranks hold none."""
        return self.writer.fence() if self.world.rank == 0 else None

    def snapshot(self, step: int) -> SnapshotWriter:
        """The writer of ``step``'s objects, fenced by `fence` (one per step, from write to commit)."""
        writer = self._snapshots.get(step)
        if writer is None:
            writer = self._snapshots[step] = SnapshotWriter(self.storage, self.executor, step, self.fence())
        return writer

    # -- 4. write, 5. vote -----------------------------------------------------------------------

    def write(self, planned: Planned, staged: Staged, progress: Progress | None) -> RankIndex:
        """Write this rank's chunks, then its rank index, and make them durable."""
        snapshot = self.snapshot(staged.step)
        rank = self.world.rank
        device_type = sorted({d.split(":")[0] for d in staged.devices.values()} or {"cpu"})[0]
        return snapshot.write_chunks(
            planned.plan.jobs(rank, staged.host, staged.pieces, planned.rank_local),
            rank=rank,
            world_size=self.world.world_size,
            device_type=device_type,
            progress=progress,
            # the coordinator's writes are made durable with its metadata, by one barrier before the marker
            durable=rank != 0,
        )

    def vote(self, step: int, write: Callable[[], RankIndex]) -> list[RankIndex]:
        """Run this rank's ``write`` and vote on it: one rank's failure fails the save everywhere.
        Returns every rank's index, gathered."""
        index = agree(self.world, f"save of step {step}: writing", write, url=self.storage.url, step=step)
        gathered = self.world.all_gather_json(index.model_dump(mode="json"), f"save of step {step}: collecting indexes")
        return [RankIndex.model_validate(i) for i in gathered]

    # -- 6. commit -------------------------------------------------------------------------------

    def seal(self, step: int, commit: Callable[[], CommitMarker]) -> CommitMarker:
        """Phase 6 on every rank: the coordinator runs ``commit`` and lets go of its claim on the
        step, then the marker is broadcast so every rank returns the same one."""

        def coordinate() -> CommitMarker:
            marker = commit()
            self.writer.release_claim(step)
            return marker

        marker = agree(
            self.world,
            f"save of step {step}: committing",
            lambda: coordinate() if self.world.rank == 0 else None,
            url=self.storage.url,
            step=step,
        )
        sealed = self.world.broadcast_json(
            marker.to_json() if marker is not None else None, f"save of step {step}: done"
        )
        return CommitMarker.model_validate(sealed)

    def commit(self, planned: Planned, staged: Staged, indexes: list[RankIndex]) -> CommitMarker:
        """Coordinator: ``run.json``, the zarr metadata and manifest, then the commit marker."""
        snapshot = self.snapshot(staged.step)
        ensure_run_info(self.storage, self.run_entry)
        manifest = manifest_for(
            staged.step,
            now_iso(),
            self._objects(planned, staged),
            planned.plan.records,
            world_size=self.world.world_size,
            device_types=sorted({d.split(":")[0] for d in planned.devices.values()} or {"cpu"}),
            info=staged.info,
        )
        if planned.rank_local:
            manifest = Manifest.model_validate({**manifest.model_dump(), "rank_local": planned.rank_local})
        manifest_bytes = snapshot.write_metadata(manifest)
        marker = snapshot.commit(manifest_bytes, manifest, indexes, writer_info())
        del self._snapshots[staged.step]
        return marker

    def _objects(self, planned: Planned, staged: Staged) -> dict[str, ObjectRecord]:
        """The state entries of the manifest: this rank's, every other rank's RNG states, and the
        union of every rank's entries of a partial object."""
        objects = dict(staged.objects)
        for rank, sent in enumerate(planned.messages):
            if rank > 0 and sent["rng"] is not None:
                objects[rng_key(rank)] = ObjectRecord.model_validate(sent["rng"])
        for key, record in staged.objects.items():
            if record.kind == "partial":
                merged = merge_partial([sent["partial"].get(key) for sent in planned.messages])
                objects[key] = record.model_copy(update={"tree": merged})
        return objects


def ensure_run_info(storage: Storage, run_entry: Mapping[str, Any] | None) -> None:
    """Write ``run.json`` (the run's identity) with the first snapshot of a run directory."""
    try:
        if storage.exists(RUN_INFO):
            return
    except UnsafeEntryError:
        return  # a link or FIFO named run.json: left alone, never written through
    info = RunInfo(
        run_id=uuid.uuid4().hex,
        created=now_iso(),
        entrypoint=(run_entry or {}).get("function"),  # never sys.argv: it may hold secrets
        entry=dict(run_entry) if run_entry is not None else None,
        versions=writer_info(),
    )
    with contextlib.suppress(FileExistsError):  # written once, by whoever comes first
        storage.create(RUN_INFO, info.model_dump_json(indent=1).encode())


def copy_snapshot(
    source: Storage,
    storage: Storage,
    writer: RunWriter,
    step: int,
    verify: Callable[[int], VerifyReport],
    progress: Progress | None = None,
) -> None:
    """Copy the committed snapshot at ``step`` of ``source`` into ``storage``, fenced as a save is.

    This process takes the run's writer lease and the step's claim, writes every object, then
    the commit marker last (created exclusively, after the lease is checked again), and
    ``verify``-es the copy; a copy that fails verification (the source changed meanwhile) is
    removed. Readers never see a mix: a snapshot already at ``step`` is un-committed first.
    ``progress`` is called with the bytes of each object copied.

    Raises:
        FencingError: another writer holds this run or the step.
        CorruptSnapshotError: the copy does not verify.
    """
    writer.prepare(step, overwrite=True)
    lease = writer.lease
    assert lease is not None
    prefix, claim, marker = snapshot_dir(step), claim_key(step), commit_key(step)
    try:
        keys = [k for k in source.list(prefix) if k not in (marker, claim)]
        for key in keys:
            lease.check()
            data = source.read(key)
            storage.write(key, data)
            if progress is not None:
                progress(len(data))
        storage.barrier(keys)
        lease.check(remote=True)
        storage.create(marker, source.read_record(marker))
        storage.barrier([marker])
        report = verify(step)
        if not report.snapshot_ok:
            storage.delete_tree(prefix, first=[marker], keep=[claim])
            raise CorruptSnapshotError(
                f"the copy fails verification ({len(report.faults)} fault(s), first: {report.faults[0].message})",
                url=storage.url,
                step=step,
            )
    finally:
        lease.forget_claim(step)
