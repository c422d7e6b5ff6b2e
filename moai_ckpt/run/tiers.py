"""The local memory tier, and how a restart chooses between it and the persistent tier.

`LocalTier` keeps one rank's latest snapshot in a local directory, typically host shared memory
(``/dev/shm``), which outlives the worker process but not the host. It is a `Checkpointer` on a
local path: the same format, checksums and commit protocol as the persistent tier, so a local
snapshot is verified on read and a half-written one is never listed. It holds the latest
committed snapshot plus the one being written. Its directory is ``<local_tier>/<run id>/rank<r>-
of-<world size>``, the run id taken from the persistent run's ``run.json``, whose copy it keeps:
a tier that holds another run's copy is ignored and never written.

`restore_newest` is the restart's choice: the newest step every rank can restore, from its local
tier or from the persistent one (a collective over the job's ranks); a snapshot that fails its
checks on any rank is passed over, with its reason logged, and the next newest is tried.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import torch

from moai_ckpt.checkpointer import Checkpointer, CheckpointerOptions
from moai_ckpt.distributed import CoordinationError, RankLostError, SingleProcess, World
from moai_ckpt.errors import (
    CorruptSnapshotError,
    MoaiCkptError,
    SnapshotNotFoundError,
    UnsupportedFormatError,
)
from moai_ckpt.format import RunInfo
from moai_ckpt.layout import RUN_INFO
from moai_ckpt.restore import SnapshotRestore
from moai_ckpt.results import RestoreInfo, SaveHandle
from moai_ckpt.sharding import is_dtensor
from moai_ckpt.storage import Storage

log = logging.getLogger("moai_ckpt.run")

__all__ = ["LOCAL", "PERSISTENT", "LocalTier", "Restored", "restore_newest"]

LOCAL = "local"
PERSISTENT = "persistent"
#: a run id is a directory name of the local tier: nothing read from storage may leave it
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
#: what makes a persistent snapshot unusable here, as for a restore with fallback
_UNUSABLE = (CorruptSnapshotError, UnsupportedFormatError, SnapshotNotFoundError, CoordinationError)


class LocalTier:
    """One rank's snapshots in a local directory: the latest committed one and the one being written.

    Args:
        root: the ``local_tier`` option (a local directory).
        every: steps between local snapshots.
        run_info: the persistent run's ``run.json`` (bytes as stored).
        rank: this rank.
        world_size: the job's ranks (a local snapshot serves a restart on the same world size).
        options: the run's `Checkpointer` options.
        background: write in a background thread (`Checkpointer.save_async`).
    """

    def __init__(
        self,
        root: str,
        every: int,
        run_info: bytes,
        *,
        rank: int,
        world_size: int,
        options: CheckpointerOptions,
        background: bool,
    ) -> None:
        run_id = RunInfo.model_validate_json(run_info).run_id
        if not _SAFE_ID.fullmatch(run_id):
            raise CorruptSnapshotError(f"run.json names the run {run_id!r}, which is not a safe directory name")
        self.every = every
        self.background = background
        self.path = os.path.join(root.removeprefix("file://"), run_id, f"rank{rank}-of-{world_size}")
        os.makedirs(self.path, exist_ok=True)
        # a tier of one rank, written by that rank alone: no collectives, leftovers of a killed
        # write removed at once, no fsync (host memory, which a host crash loses anyway)
        self.ckpt = Checkpointer(
            self.path, options=options.model_copy(update={"leftover_grace_s": 0.0}), local=True, fsync=False
        )
        self.ckpt.events.tier = "memory"  # its saves and restores are reported as the memory tier's
        self.usable = self._claim(run_info, run_id)
        self.failures = 0
        self._pending: tuple[int, SaveHandle | None] | None = None
        self._sharded: bool | None = None  # whether the state holds DTensors (found at the first snapshot)

    @classmethod
    def open(
        cls,
        root: str | None,
        every: int | None,
        storage: Storage,
        *,
        rank: int,
        world_size: int,
        options: CheckpointerOptions,
        background: bool,
    ) -> LocalTier | None:
        """The local tier of the run in ``storage``; None when there is none (not set, or a run not yet begun)."""
        if root is None or every is None:
            return None
        try:
            run_info = storage.read_record(RUN_INFO)
        except FileNotFoundError:
            return None  # a new run: its run.json comes with its first snapshot
        try:
            return cls(root, every, run_info, rank=rank, world_size=world_size, options=options, background=background)
        except (MoaiCkptError, OSError, ValueError) as exc:
            log.warning("the local tier under %s is not used: %s", root, exc)
            return None

    def _claim(self, run_info: bytes, run_id: str) -> bool:
        """Mark the directory as this run's (a copy of its run.json); False if another run holds it."""
        storage = self.ckpt.storage
        if not storage.exists(RUN_INFO):
            storage.create(RUN_INFO, run_info)
        try:
            held = RunInfo.model_validate_json(storage.read_record(RUN_INFO)).run_id
        except (ValueError, MoaiCkptError) as exc:
            held = f"unreadable ({exc})"
        if held != run_id:
            log.warning(
                "the local tier %s belongs to run %s, not %s: it is ignored and not written", self.path, held, run_id
            )
            return False
        return True

    def steps(self) -> list[int]:
        """The committed local snapshots, oldest first (none when the tier is another run's)."""
        return self.ckpt.steps() if self.usable else []

    def restore(self, state: MutableMapping[str, Any], step: int) -> RestoreInfo:
        """Load the local snapshot of ``step`` into ``state`` (every chunk checked first)."""
        self.ckpt.restore(state, step=step)
        assert self.ckpt.last_restore is not None
        return self.ckpt.last_restore

    def size(self, step: int) -> int:
        return self.ckpt.marker(step).body.total_bytes

    def latest_committed(self) -> int | None:
        """The newest committed local snapshot, once the one in flight has settled."""
        self.settle()
        steps = self.steps()
        return steps[-1] if steps else None

    def take(self, step: int, state: dict[str, Any], info: dict[str, Any] | None, *, keep_from: int | None) -> None:
        """Snapshot ``step`` to the local tier, after deleting local snapshots older than ``keep_from``.

        Failures are counted and logged, never raised: the persistent tier and the log go on.
        """
        if not self.usable:
            return
        if keep_from is not None:
            self._delete_before(keep_from)
        if self._sharded is None:
            self._sharded = _holds_sharded_tensors(state)
            if self._sharded:
                log.warning(
                    "the local tier is not written: the state holds sharded tensors (DTensor), which it cannot hold yet"
                )
        if self._sharded:
            return
        try:
            if self.background:
                self._pending = (step, self.ckpt.save_async(step, state, overwrite=True, info=info))
                return
            self.ckpt.save(step, state, overwrite=True, info=info)
        except MoaiCkptError as exc:
            self._failed(step, exc)
            return
        self._committed(step)

    def poll(self) -> None:
        """Settle the local snapshot in flight if it is done (never waits)."""
        if self._pending is not None and self._pending[1] is not None and self._pending[1].done():
            self.settle()

    def settle(self) -> None:
        """Wait for the local snapshot in flight; once committed, older ones are deleted."""
        if self._pending is None:
            return
        step, handle = self._pending
        self._pending = None
        if handle is None:
            return
        try:
            handle.result()
        except MoaiCkptError as exc:
            self._failed(step, exc)
            return
        self._committed(step)

    def _committed(self, step: int) -> None:
        log.debug("local snapshot of step %d committed in %s", step, self.path)

    def _delete_before(self, step: int) -> None:
        """Delete the committed local snapshots older than ``step`` and any leftover of a killed write."""
        keep = len([s for s in self.steps() if s >= step])
        try:
            self.ckpt.prune(keep=max(keep, 1))
        except MoaiCkptError as exc:
            log.warning("could not delete older local snapshots in %s: %s", self.path, exc)

    def _failed(self, step: int, exc: Exception) -> None:
        self.failures += 1
        log.warning("the local snapshot of step %d failed and is skipped: %s", step, exc)

    def close(self) -> None:
        try:
            self.settle()
        finally:
            self.ckpt.close()


def _holds_sharded_tensors(state: dict[str, Any]) -> bool:
    """Whether a tracked module's parameters or buffers are DTensors (FSDP2, tensor parallel)."""
    modules = [obj for obj in state.values() if isinstance(obj, torch.nn.Module)]
    return any(is_dtensor(t) for m in modules for t in (*m.parameters(), *m.buffers()))


@dataclass
class Restored:
    """What `restore_newest` loaded on this rank."""

    step: int
    tier: str
    nbytes: int
    info: RestoreInfo


def restore_newest(
    world: World,
    ckpt: Checkpointer,
    local: LocalTier | None,
    persistent: list[int],
    *,
    newest_local: int | None,
    fresh_state: Callable[[], dict[str, Any]],
    keep: Callable[[dict[str, Any]], None],
    unusable: set[int],
) -> Restored | None:
    """Restore the newest step every rank can restore, each rank from its local tier or the persistent one.

    Collective. The candidates are the persistent steps and the local steps every rank holds
    (up to ``newest_local``: a local snapshot counts only if the log holds its step, so the log
    stays whole); each rank reads the newest candidate from its local tier when it has it. A
    snapshot that fails its checks on any rank is passed over everywhere (the reason is logged)
    and the next newest is tried. Persistent steps found unusable join ``unusable``.

    Returns:
        What this rank restored, or None when no candidate could be restored.
    """
    persistent = list(persistent)
    failed_here: set[int] = set()
    while True:
        own = local.steps() if local is not None else []
        mine = [s for s in own if newest_local is not None and s <= newest_local and s not in failed_here]
        everyone = world.all_gather_json(mine, "choosing the tier to resume from")
        common = set.intersection(*(set(m) for m in everyone))
        candidates = set(persistent) | common
        if not candidates:
            return None
        step = max(candidates)
        tier = LOCAL if step in mine else PERSISTENT
        restored, error = _restore_one(world, ckpt, local, step, tier, fresh_state, keep)
        verdicts = world.all_gather_json([tier, error], f"restoring step {step}")
        if restored is not None and all(e is None for _, e in verdicts):
            return restored
        if error is not None and tier == LOCAL:
            failed_here.add(step)
        if any(t == PERSISTENT and e is not None for t, e in verdicts):
            persistent.remove(step)
            unusable.add(step)
        failed = {r: f"{t} tier: {e}" for r, (t, e) in enumerate(verdicts) if e is not None}
        if world.rank == 0:
            log.warning("step %d cannot be restored on rank(s) %s; trying the next newest", step, failed)


def _restore_one(
    world: World,
    ckpt: Checkpointer,
    local: LocalTier | None,
    step: int,
    tier: str,
    fresh_state: Callable[[], dict[str, Any]],
    keep: Callable[[dict[str, Any]], None],
) -> tuple[Restored | None, str | None]:
    """This rank's restore of ``step`` from ``tier``, on its own; returns it or why it failed."""
    state = fresh_state()
    # a local snapshot is only a faster copy: anything wrong with it sends the rank elsewhere
    unusable = (MoaiCkptError,) if tier == LOCAL else _UNUSABLE
    try:
        if tier == LOCAL:
            assert local is not None
            info, nbytes = local.restore(state, step), local.size(step)
        else:
            solo = SnapshotRestore(
                ckpt.catalog, SingleProcess(world.rank, world.world_size), capture_rng=ckpt.options.capture_rng
            )
            info = solo.run(state, step, fallback=False, restore_rng=None, progress=None)
            ckpt.last_restore = info
            nbytes = ckpt.marker(step).body.total_bytes
    except RankLostError:
        raise
    except unusable as exc:
        log.warning("the %s snapshot of step %d cannot be restored on rank %d (%s)", tier, step, world.rank, exc)
        return None, f"{type(exc).__name__}: {exc}"
    keep(state)
    return Restored(step, tier, nbytes, info), None
